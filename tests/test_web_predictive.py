"""The predictive-text web page (examples/predictive_text/web) in headless Chromium.

A tiny random Llama is exported to ONNX by the real pipeline; the page's server
(``python -m examples.predictive_text.web``) serves it with the local onnxruntime-web files, and
Debian's chromium, driven by playwright-core (web/drive.mjs), loads the page offline. The browser's
tokenizer, logits and suggestions are compared with the Python side on the same bundle: the
``tokenizers`` library, onnxruntime, and examples/predictive_text/suggest.py's Predictor.

Needs node + npm (the npm packages are installed here with ``npm ci`` if missing) and chromium
(``apt-get install -y chromium``); without them the browser test is skipped, saying what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.common import AppError, open_bundle  # noqa: E402
from examples.predictive_text.suggest import Predictor  # noqa: E402
from examples.predictive_text.web import server as web_server  # noqa: E402

WEB = ROOT / "examples" / "predictive_text" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TOKENIZER_SAMPLES = [
    "Hello world", "It is a truth universally acknowledged, that a single man",
    "Naïve café owners said “héllo” 😀 to Zoë — twice.", "  spaces   and\ttabs\n\nnewlines ",
    "I'll we've they're 12345 3.14", "日本語のテキスト", "émigré's résumé ÆØÅ", "</s>inline<s> special", "",
]
# (prefixes the random tiny model completes to known words within the call budget: "It is a tr" it does not)
SUGGEST_TEXTS = ["It is a truth ", "She said th", "She said ", "Mr. Bennet replied that he had not ", "\nT", "Zoë went to the m"]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    """A tiny Llama exported by the real pipeline (onnx fp32)."""
    from exporter.pipeline import ExportRequest, run

    out = tmp_path_factory.mktemp("web") / "tiny-onnx"
    run(ExportRequest(target="host", out=out, model=str(tiny_model_dir("llama")), format="onnx", recipe="fp32",
                      measure=False, cache_dir=tmp_path_factory.mktemp("cache")))
    return out


@pytest.fixture(scope="module")
def web_ready():
    """node_modules installed (``npm ci`` once if missing) and chromium present; else skip, naming the fix."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed for the web page test (apt-get install -y nodejs npm)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    if not (WEB / "node_modules" / "onnxruntime-web" / "dist").is_dir() or not (WEB / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--prefix", str(WEB), "--no-audit", "--no-fund"], check=True, timeout=600,
                       env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
    return True


@pytest.fixture(scope="module")
def page_server(tiny_bundle, web_ready):
    """The page's server on a free port (started as users start it); yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "examples.predictive_text.web", "--bundle", str(tiny_bundle),
                             "--port", "0", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line + proc.stderr.read()
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drive(task: dict, tmp_path: Path) -> dict:
    """Run web/drive.mjs (headless chromium via playwright-core) on ``task``; its JSON results."""
    task = {"chromium": CHROMIUM, "profile": str(tmp_path / "profile"), "timeoutMs": 60000, **task}
    (tmp_path / "task.json").write_text(json.dumps(task))
    done = subprocess.run(["node", str(WEB / "drive.mjs"), str(tmp_path / "task.json")], cwd=WEB,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not out.get("error"), f"{out['error']}\nconsole: {out['console']}"
    return out


def test_page_matches_python_side(page_server, tiny_bundle, tmp_path):
    bundle = open_bundle(tiny_bundle, threads=1)
    prompt = bundle.encode("It is a truth universally acknowledged")
    typed = "Mr. Bennet said that he w"  # (the random model then shows 2 words after Tab, for the click)
    out = drive({"url": page_server, "tokenize": TOKENIZER_SAMPLES, "logits": [prompt, prompt[:3]],
                 "suggest": SUGGEST_TEXTS, "type": typed, "tab": True}, tmp_path)

    # Offline: every request went to the page's own server (no CDN, nothing else), and no errors.
    assert out["requests"] and all(u.startswith(page_server) for u in out["requests"]), out["requests"]
    assert any(u.endswith(".wasm") for u in out["requests"])
    assert any(u.endswith("/bundle/words.json") for u in out["requests"])  # the whole-word list
    assert not [m for m in out["console"] if m.startswith(("error", "pageerror"))], out["console"]

    # The JS tokenizer gives the `tokenizers` library's ids (non-ASCII, emoji, added tokens included).
    assert out["tokens"] == [bundle.encode(s) for s in TOKENIZER_SAMPLES]

    # onnxruntime-web's next-token logits (with the KV cache reused between the two calls) = onnxruntime's.
    for ids, got in zip([prompt, prompt[:3]], out["logits"]):
        bundle.runner.reset()
        want = bundle.runner.forward(ids)[-1]
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-3)

    # The page's suggestions are the Python predictor's, for direct calls and for real keystrokes.
    def python_words(text):
        return [s for s in Predictor(bundle).suggest(text)]

    for text, words in zip(SUGGEST_TEXTS, out["suggest"]):
        assert words == [s.word for s in python_words(text)], text
        assert words, text  # (a random tiny model can leave fewer than 3 within the call budget)
    shown = out["typed"]["shown"]
    want = python_words(typed)
    assert shown["text"] == typed and shown["words"] == [s.word for s in want]
    assert out["typed"]["buttons"] == shown["words"]
    assert all(w.startswith("w") for w in shown["words"])  # completing the typed "w", whole words
    assert "keystroke → suggestions" in out["typed"]["latencyText"] and out["typed"]["latencies"]

    # Tab accepts suggestion 1, a click on the second button accepts suggestion 2.
    assert out["afterTab"]["value"] == typed + want[0].completion
    after_tab = python_words(out["afterTab"]["value"])
    assert out["afterTab"]["shown"]["words"] == [s.word for s in after_tab]
    assert out["afterClick"]["value"] == out["afterTab"]["value"] + after_tab[1].completion


def test_server_errors_are_one_clear_message(tiny_bundle, tmp_path, monkeypatch):
    # A bundle that is not an ONNX causal LM, run as users run it: one message, no traceback.
    import shutil

    from test_untrusted import edit_spec, reseal

    bad = shutil.copytree(tiny_bundle, tmp_path / "bad")
    import json

    from exporter.runtime.spec import contract_fields

    layers = json.loads((bad / "runtime.json").read_text())["num_layers"]
    # a well-formed, verified bundle (its contract a tflite one) of a format the page cannot run
    edit_spec(bad, format="tflite", **contract_fields("tflite", "causal-lm", layers, 64, [32]))
    reseal(bad)
    if (WEB / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        done = subprocess.run([sys.executable, "-m", "examples.predictive_text.web", "--bundle", str(bad)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "runs onnx causal LMs" in done.stderr
    # Without node_modules the error names the command that fixes it.
    monkeypatch.setattr(web_server, "ORT_DIST", tmp_path / "missing")
    with pytest.raises(AppError) as err:
        web_server.check_setup(tiny_bundle)
    assert "npm ci --prefix examples/predictive_text/web" in str(err.value)
