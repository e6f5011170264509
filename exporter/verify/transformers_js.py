"""transformers.js (``@huggingface/transformers``, npm) in Node: does an ONNX bundle load and decode there?

transformers.js loads a folder's ``config.json``, ``generation_config.json`` and
``{subfolder}/{model_file_name}{dtype suffix}.onnx`` (``src/models/session.js`` getSession,
``src/utils/model-loader.js`` getCoreModelFile, ``src/utils/dtypes.js`` DEFAULT_DTYPE_SUFFIX_MAPPING;
defaults ``subfolder: 'onnx'``, ``model_file_name: 'model'``, dtype fp32 on Node's cpu device and q8, i.e.
``model_quantized.onnx``, on the browser's wasm device). A bundle keeps its artifact where runtime.json
says (``model.onnx``), so the options that load it are ``subfolder`` = the artifact's folder (``''``),
``model_file_name`` = its stem and ``dtype: 'fp32'``. In transformers.js 4.3 a dtype only picks that
file-name suffix (and is recorded on the session): it does not convert or re-quantize anything, so
an int8 (MatMulNBits) bundle loaded with ``dtype: 'fp32'`` runs its own int8 graph; the recipe is in
runtime.json and the manifest. The same options work for ``pipeline('text-generation', dir, ...)``.

The greedy run is ``transformers_js.mjs`` beside this file, run with ``node``. The package is looked up in
``$SLM_EXPORT_NODE_MODULES``, else in the repo's ``examples/predictive_text/web/node_modules`` (installed by
``npm ci --prefix examples/predictive_text/web``, with ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's
postinstall otherwise tries to download CUDA libraries; its CPU build is inside the npm package).
Offline: local files only, remote models off, no file cache.

Gemma-3: transformers.js feeds ``gemma3_text`` / ``gemma3`` (and paligemma) position ids that start at 1
(``src/models/modeling_utils.js`` decoder_forward, ``create_position_ids(..., start_index = 1)``), ours and
transformers' start at 0. Every RoPE angle is then shifted by one position; attention depends on relative
positions only, so the logits agree up to rounding, but greedy tokens may part at a near-tie (the row then
says "differs", with this reason). transformers.js gives no option to change it: it recomputes the
positions at every step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

from ..runtime.base import read_spec
from ..runtime.files import read_json
from . import FieldRuntime, GreedyRun, register

NODE_MODULES_ENV = "SLM_EXPORT_NODE_MODULES"
PACKAGE = "@huggingface/transformers"
SCRIPT = Path(__file__).with_name("transformers_js.mjs")
REPO_NODE_MODULES = Path(__file__).resolve().parents[2] / "examples" / "predictive_text" / "web" / "node_modules"
TIMEOUT_S = 900  # a 135M model loads in seconds; generous for a loaded 2-core machine


def node_modules() -> Path | None:
    """The node_modules folder holding transformers.js: $SLM_EXPORT_NODE_MODULES, else the repo's web demo's."""
    env = os.environ.get(NODE_MODULES_ENV)
    if env:
        return Path(env)
    return REPO_NODE_MODULES if REPO_NODE_MODULES.is_dir() else None


def version() -> str | None:
    """The installed transformers.js version, or None without ``node`` or the package."""
    nm = node_modules()
    if shutil.which("node") is None or nm is None:
        return None
    try:
        return str(read_json(nm / PACKAGE / "package.json", 1 << 20, "package.json")["version"])
    except Exception:
        return None


def load_options(spec: dict) -> dict:
    """transformers.js from_pretrained / pipeline options that load the artifact runtime.json names."""
    artifact = PurePosixPath(spec["artifact"])
    if artifact.suffix != ".onnx":
        raise ValueError(f"transformers.js loads a .onnx file, the bundle's artifact is {artifact}")
    folder = str(artifact.parent)
    return {"subfolder": "" if folder == "." else folder, "model_file_name": artifact.stem, "dtype": "fp32"}


ONE_BASED_POSITIONS = ("gemma3_text", "gemma3", "paligemma")  # transformers.js's decoder_forward list


def _generate(bundle_dir: Path, manifest: dict, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    bundle_dir = Path(bundle_dir).resolve()  # transformers.js takes a relative "a/b" for a hub model id
    spec = read_spec(bundle_dir)
    job = {"bundle_dir": str(bundle_dir), "prompt_ids": [int(t) for t in prompt_ids], "n_tokens": int(n_tokens),
           "options": load_options(spec)}
    proc = subprocess.run(["node", str(SCRIPT), str(node_modules()), json.dumps(job)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        # Node's last lines are the version and a stack; the message is the first "Error" line.
        message = next((ln for ln in err if "Error" in ln), err[-1] if err else f"exit code {proc.returncode}")
        raise RuntimeError(f"transformers.js: {message.strip()}")
    out = json.loads(lines[-1])
    note = f"dtype {out.get('dtype')} (file name), load {out.get('load_s', 0):.1f} s"
    if spec.get("model_type") in ONE_BASED_POSITIONS:
        note += f"; transformers.js feeds {spec['model_type']} position ids from 1 (ours from 0)"
    return GreedyRun([int(t) for t in out["tokens"]], out.get("decode_tokens_per_s"), note=note)


register(FieldRuntime(
    name="transformers.js", formats=("onnx",), distribution=PACKAGE, module="", generate=_generate,
    install="ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix examples/predictive_text/web (Node.js and npm), "
            f"or set {NODE_MODULES_ENV}",
    version=version, order=40,
))
