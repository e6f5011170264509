"""transformers.js (@huggingface/transformers, in Node) loads an ONNX bundle and decodes the greedy tokens
our own ONNX runner decodes: from_pretrained + generate, the text-generation pipeline with its
tokenizer, and the verify row. Tiny random models exported by the real CLI; one real SmolLM2 case (slow).

Needs node and the web demo's node_modules (``ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix
examples/predictive_text/web``, as the README's test command does); without node the tests skip, saying so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter.verify import FAILED, NOT_INSTALLED, OK, greedy_case, verify
from exporter.verify import slm_export, transformers_js
from test_cli import run_cli
from tiny_models import make_model_dir

ROOT = Path(__file__).resolve().parent.parent
TEXT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None:
        pytest.skip("node is needed for transformers.js (apt-get install -y nodejs npm)")
    nm = transformers_js.node_modules()
    assert nm is not None and (nm / "@huggingface" / "transformers").is_dir(), (
        "transformers.js is not installed: ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix examples/predictive_text/web")
    return nm


def untied_model_dir(arch: str, folder: Path) -> Path:
    """The family's tiny model with its own random output layer.

    The tiny models tie lm_head to the embedding and scale it by 8, so the last input token's own
    embedding wins every argmax: greedy decoding repeats the prompt's last token whatever the runtime
    computes elsewhere. An untied head makes greedy tokens vary, so a runtime that computes other
    logits (wrong positions, a cache fed wrongly) gives other tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    make_model_dir(arch, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    emb = model.get_input_embeddings().weight
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(emb) * emb.std() * 8)
    model.save_pretrained(folder)
    return folder


CASES = {  # name: (arch, CLI arguments)
    "llama-rpi": ("llama", ("--target", "rpi")),  # ONNX int8-dynamic: com.microsoft MatMulNBits, 8 bits
    "llama-fp32": ("llama", ("--target", "host", "--format", "onnx", "--recipe", "fp32")),
    "gemma3-rpi": ("gemma3", ("--target", "rpi")),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            arch, args = CASES[case]
            model = tmp_path_factory.getbasetemp() / f"tjs-tiny-{arch}"
            if not model.exists():
                untied_model_dir(arch, model)
            out = tmp_path_factory.mktemp("tjs") / case
            proc = run_cli(*args, "--model", model, "--out", out, "--no-latency")
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[case] = out
        return made[case]

    return get


def tokenize(bundle: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids


def onnx_greedy(bundle: Path, prompt: list[int], n: int, first_position: int) -> list[int]:
    """Greedy tokens of the bundle's graph in onnxruntime, position ids counted from ``first_position``."""
    import numpy as np
    import onnxruntime as ort

    spec = json.loads((bundle / "runtime.json").read_text())
    session = ort.InferenceSession(str(bundle / spec["artifact"]), providers=["CPUExecutionProvider"])
    past = {name: np.zeros((1, spec["num_kv_heads"], 0, spec["head_dim"]), np.float32)
            for name in spec["cache"]["inputs"]}
    tokens, ids, seen = [], prompt, 0
    while len(tokens) < n:
        out = session.run(None, {
            "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, seen + len(ids)), np.int64),
            "position_ids": np.arange(seen, seen + len(ids), dtype=np.int64)[None] + first_position, **past})
        past, seen = dict(zip(spec["cache"]["inputs"], out[1:])), seen + len(ids)
        ids = [int(out[0][0, -1].argmax())]
        tokens += ids
    return tokens


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_our_onnx_runner(bundles, node_modules, case):
    """Llama: transformers.js's greedy tokens are our runner's. Gemma-3: transformers.js counts positions
    from 1 (see exporter/verify/transformers_js.py), so its tokens are those of our graph fed positions
    from 1 (and may part from ours at a near-tie: this text's token 5 does, at a logit margin of 0.18)."""
    bundle = bundles(case)
    first_position = 1 if CASES[case][0] == "gemma3" else 0
    for prompt in (greedy_case(bundle)[0], tokenize(bundle, TEXT)):
        ours = slm_export._generate(bundle, {}, prompt, 16).tokens
        assert len(set(ours)) >= 4, ours  # not one repeated token: a wrong runtime would differ
        assert onnx_greedy(bundle, prompt, 16, 0) == ours
        theirs = transformers_js._generate(bundle, {}, prompt, 16)
        assert theirs.tokens == onnx_greedy(bundle, prompt, 16, first_position)
        assert theirs.decode_tokens_per_s and theirs.decode_tokens_per_s > 0
        assert ("position ids from 1" in theirs.note) == bool(first_position)


@pytest.mark.parametrize("case", ["llama-rpi", "llama-fp32"])
def test_verify_row_is_ok(bundles, node_modules, case):
    rows = {r.runtime: r for r in verify(bundles(case))}
    row = rows["transformers.js"]
    assert (row.status, row.loads, row.same_as_ours) == (OK, True, True), row
    version = json.loads((node_modules / "@huggingface" / "transformers" / "package.json").read_text())["version"]
    assert row.version == version
    assert row.tokens == rows["slm-export"].tokens and len(row.tokens) == 32  # the gate's greedy tokens


PIPELINE = """
import { createRequire } from 'node:module';
const [nm, dir, text, options] = process.argv.slice(1);
const { env, pipeline } = createRequire(nm + '/noop.js')('@huggingface/transformers');
env.allowRemoteModels = false;
env.useFSCache = false;
const generate = await pipeline('text-generation', dir, { local_files_only: true, ...JSON.parse(options) });
const ids = generate.tokenizer(text).input_ids.tolist()[0].map(Number);
const [out] = await generate(text, { max_new_tokens: 12, do_sample: false, eos_token_id: null });
console.log(JSON.stringify({ ids, text: out.generated_text }));
"""


def test_text_generation_pipeline_with_the_bundle_tokenizer(bundles, node_modules):
    """pipeline('text-generation', bundle, options) with the bundle's tokenizer.json: the same prompt ids
    as the tokenizers library, and the text of our runner's greedy tokens."""
    from tokenizers import Tokenizer

    bundle = bundles("llama-rpi")
    options = transformers_js.load_options(json.loads((bundle / "runtime.json").read_text()))
    assert options == {"subfolder": "", "model_file_name": "model", "dtype": "fp32"}
    proc = subprocess.run(["node", "--input-type=module", "-e", PIPELINE, str(node_modules), str(bundle), TEXT,
                           json.dumps(options)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    prompt = tokenize(bundle, TEXT)
    assert out["ids"] == prompt
    ours = slm_export._generate(bundle, {}, prompt, 12).tokens
    assert out["text"] == Tokenizer.from_file(str(bundle / "tokenizer.json")).decode(prompt + ours)


def test_graph_dimensions_have_the_names_transformers_js_resolves(bundles):
    """transformers.js sizes its empty first cache from the graph's input shapes, resolving only
    "batch_size": another name for the batch gives a (0, heads, 0, head_dim) cache that fails to reshape."""
    import onnx

    model = onnx.load(str(bundles("llama-rpi") / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    spec = json.loads((bundles("llama-rpi") / "runtime.json").read_text())
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", spec["num_kv_heads"], "past_sequence_length", spec["head_dim"]]


def test_without_the_package_the_row_says_not_installed(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv(transformers_js.NODE_MODULES_ENV, str(tmp_path))  # an empty node_modules
    rows = {r.runtime: r for r in verify(bundles("llama-rpi"))}
    row = rows["transformers.js"]
    assert row.status == NOT_INSTALLED and row.loads is None and "npm ci" in row.message
    assert rows["slm-export"].status == OK  # ours still runs


def test_a_bundle_transformers_js_cannot_run_is_a_failed_row(bundles, tmp_path):
    """A runtime that rejects the bundle is FAILED with its message, not a crash of verify()."""
    src = bundles("llama-rpi")
    bundle = tmp_path / "broken"
    shutil.copytree(src, bundle)
    (bundle / "model.onnx").write_bytes(b"not an onnx model")
    row = {r.runtime: r for r in verify(bundle)}["transformers.js"]
    assert (row.status, row.loads) == (FAILED, False) and row.message.startswith("RuntimeError: transformers.js: "), row


@pytest.mark.slow
def test_real_smollm2_rpi_bundle(real_smollm2_bundle, node_modules):
    """The embedded SmolLM2-135M-Instruct, --target rpi (ONNX int8-dynamic): transformers.js decodes our
    runner's greedy tokens on the bundle's chat prompt and on plain text."""
    out = real_smollm2_bundle("rpi-onnx")
    rows = {r.runtime: r for r in verify(out)}
    assert rows["transformers.js"].status == OK, rows["transformers.js"]
    assert rows["transformers.js"].same_as_ours
    prompt = tokenize(out, "The capital of France is")
    ours = slm_export._generate(out, {}, prompt, 16).tokens
    assert transformers_js._generate(out, {}, prompt, 16).tokens == ours
    assert len(set(ours)) > 3


# The browser: transformers.js's web build (dist/transformers.min.js, onnxruntime-web inside) in headless
# Chromium, driven by playwright-core, on a page served from loopback with its own wasm files (never the CDN
# transformers.js points onnxruntime-web at by default, src/backends/onnx.js).
PAGE = """<!doctype html><meta charset="utf-8"><title>transformers.js</title>
<script type="module">
import { env, AutoModelForCausalLM, Tensor } from '/tjs/transformers.min.js';
env.allowRemoteModels = false;
env.allowLocalModels = true;  // the browser's default is false: local here means this server
env.useBrowserCache = false;
env.useWasmCache = false;
env.backends.onnx.wasm.wasmPaths = {mjs: '/ort/ort-wasm-simd-threaded.asyncify.mjs', wasm: '/ort/ort-wasm-simd-threaded.asyncify.wasm'};
window.run = async (job) => {
  const model = await AutoModelForCausalLM.from_pretrained('/bundle', {local_files_only: true, device: 'wasm', ...job.options});
  const ids = job.prompt_ids.map(BigInt);
  const out = await model.generate({
    input_ids: new Tensor('int64', BigInt64Array.from(ids), [1, ids.length]),
    attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
    max_new_tokens: job.n_tokens, do_sample: false, eos_token_id: null, repetition_penalty: 1.0});
  return out.tolist()[0].slice(ids.length).map(Number);
};
window.ready = true;
</script>
"""

DRIVE = """
import { createRequire } from 'node:module';
const [nm, url, chromiumPath, job] = process.argv.slice(1);
const { chromium } = createRequire(nm + '/noop.js')('playwright-core');
const browser = await chromium.launch({executablePath: chromiumPath, headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update']});
const requests = [], messages = [];
try {
  const page = await browser.newPage();
  page.on('request', (r) => requests.push(r.url()));
  page.on('pageerror', (e) => messages.push('pageerror: ' + e.message));
  await page.goto(url);
  await page.waitForFunction(() => window.ready, null, {timeout: 60000});
  let tokens = null, error = null;
  try { tokens = await page.evaluate((j) => window.run(j), JSON.parse(job)); } catch (e) { error = String(e); }
  console.log(JSON.stringify({tokens, error, requests, messages}));
} finally { await browser.close(); }
"""
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def page_url(bundles, node_modules):
    """A loopback server of the page, transformers.js's web build, its onnxruntime-web wasm files and the bundle."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    tjs = node_modules / "@huggingface" / "transformers"
    roots = {"tjs": tjs / "dist", "bundle": bundles("llama-rpi"),
             "ort": tjs / "node_modules" / "onnxruntime-web" / "dist"}  # the onnxruntime-web transformers.js pins
    types = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            folder, _, name = self.path.split("?")[0].lstrip("/").partition("/")
            if self.path == "/":
                body, kind = PAGE.encode(), "text/html; charset=utf-8"
            elif folder in roots and name and "/" not in name and ".." not in name and (roots[folder] / name).is_file():
                body, kind = (roots[folder] / name).read_bytes(), types.get(Path(name).suffix, "application/octet-stream")
            else:
                self.send_error(404)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the browser closed it (closing at the end)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_browser_web_build_decodes_our_greedy_tokens(bundles, node_modules, page_url):
    """The int8 bundle (8-bit MatMulNBits) in Chromium through transformers.js's web build and its
    onnxruntime-web (wasm): our runner's greedy tokens, every request to the loopback server."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    bundle = bundles("llama-rpi")
    prompt = tokenize(bundle, TEXT)
    job = {"prompt_ids": prompt, "n_tokens": 12,
           "options": transformers_js.load_options(json.loads((bundle / "runtime.json").read_text()))}
    proc = subprocess.run(["node", "--input-type=module", "-e", DRIVE, str(node_modules), page_url, CHROMIUM,
                           json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is None and not out["messages"], out
    ours = slm_export._generate(bundle, {}, prompt, 12).tokens
    assert out["tokens"] == ours
    assert all(url.startswith(page_url) for url in out["requests"]), out["requests"]
    assert page_url + "ort/ort-wasm-simd-threaded.asyncify.wasm" in out["requests"]
