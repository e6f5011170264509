"""llama.cpp (the peer runtime), the field's reference runtime for GGUF files, in an environment of its own.

There is no llama.cpp wheel on PyPI: ``llama-cpp-python`` is an sdist that vendors llama.cpp and
compiles it with the machine's cmake and C++ compiler (minutes of CPU). It is built once, into its
own virtual environment under the model cache (``<cache>/llama-cpp/<version>-<build id>``), so its
build requirements never touch slm-export's environment.

``cross_check`` compares the loaded PyTorch model with llama.cpp on the *same GGUF file and tokens*:
if transformers' GGUF conversion, the tokenizer or the config went wrong, the two disagree and the
export is refused (exporter/reference.py) instead of gating artifacts against a broken reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SlmExportError

VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python=={VERSION}"
WORKER = Path(__file__).with_name("llama_cpp_worker.py")
READY = ".ready"  # written last: an environment without it is a half-finished build and is rebuilt
# Only the library is needed (no tests, examples, server or tools): about half the build time.
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON")
# Native code minus AMX: on a VM whose CPU reports AMX (Sapphire Rapids) ggml's AMX matmul segfaulted
# on the first eval (gdb: ggml_backend_amx_mul_mat, 2026-12-02). Explicit -mno-* flags win over the
# -march=native that GGML_NATIVE adds; AMX only speeds up large-batch prefill.
COMPILER_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# The environment's folder names the build settings too, so a build made with other settings (an
# older slm-export's, with AMX) is never reused.
BUILD_ID = hashlib.sha256(f"{CMAKE_ARGS}|{COMPILER_FLAGS}".encode()).hexdigest()[:8]
# PyTorch (float weights dequantized from the GGUF) and llama.cpp (the quantized blocks, with its
# own 8-bit activation rounding in the dot products) agree closely but not exactly; measured on
# SmolLM2-135M: top-1 0.953, ppl +0.8%, tokens identical. A broken conversion or tokenizer lands far outside.
MIN_TOP1 = 0.90
MAX_PPL_REL_CHANGE = 0.10
TIMEOUT_S = 900


class LlamaCppUnavailable(SlmExportError):
    """llama.cpp could not be built or run here."""


def env_dir(cache_dir: Path | None = None) -> Path:
    """Where llama.cpp's environment lives (built by ``ensure_environment``)."""
    from .loading import default_cache_dir

    return (cache_dir or default_cache_dir()) / "llama-cpp" / f"{VERSION}-{BUILD_ID}"


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def is_built(cache_dir: Path | None = None) -> bool:
    return (env_dir(cache_dir) / READY).is_file()


def ensure_environment(cache_dir: Path | None = None, progress: Callable[[str], None] = lambda m: None) -> Path:
    """Build llama.cpp's environment once (from the registry's sdist) and return its Python."""
    env = env_dir(cache_dir)
    if (env / READY).is_file():
        return python_of(env)
    if env.exists():
        shutil.rmtree(env)  # an interrupted build: start over
    env.parent.mkdir(parents=True, exist_ok=True)
    progress(f"llama.cpp: building {PACKAGE} in {env} (once; several CPU-minutes)")
    t0 = time.perf_counter()
    log = env.parent / f"build-{VERSION}.log"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    # --no-cache-dir: pip's wheel cache keys a built wheel by the sdist alone, not by the compiler
    # flags, so it would hand back a wheel built with other settings.
    cmd = [str(python_of(env)), "-m", "pip", "install", "--quiet", "--no-cache-dir", "numpy", PACKAGE]
    build_env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
                 "CFLAGS": COMPILER_FLAGS, "CXXFLAGS": COMPILER_FLAGS}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=build_env)
        while proc.poll() is None:
            time.sleep(5)
            if int(time.perf_counter() - t0) % 60 < 5:
                progress(f"llama.cpp: still building ({time.perf_counter() - t0:.0f} s)")
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        shutil.rmtree(env, ignore_errors=True)
        raise LlamaCppUnavailable(f"building {PACKAGE} failed (exit {proc.returncode}): {' / '.join(tail)}",
                                  hint=f"it needs cmake and a C++ compiler; the whole log is {log}")
    (env / READY).write_text(f"{PACKAGE}\n")
    progress(f"llama.cpp: built in {time.perf_counter() - t0:.0f} s")
    return python_of(env)


def run_worker(python: Path, gguf: Path, windows: list[list[int]], text: str, threads: int | None = None) -> dict:
    """llama.cpp's logits for each window and its tokenization of ``text`` (see llama_cpp_worker.py)."""
    with tempfile.TemporaryDirectory(prefix="slm-llama-cpp-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "out.npz"
        request.write_text(json.dumps({"windows": windows, "text": text, "threads": threads or os.cpu_count()}))
        try:
            proc = subprocess.run([str(python), "-I", str(WORKER), str(gguf), str(request), str(out)],
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise LlamaCppUnavailable(f"llama.cpp did not finish within {TIMEOUT_S} s on {gguf.name}") from None
        if proc.returncode != 0 or not out.is_file():
            raise LlamaCppUnavailable(f"llama.cpp could not run {gguf.name}: {_last_line(proc)}")
        with np.load(out) as data:
            return {"logits": [data[f"logits_{i}"] for i in range(len(windows))], "text_ids": data["text_ids"].tolist()}


def _last_line(proc: subprocess.CompletedProcess) -> str:
    """The worker's last line of output (its error), shortened."""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return tail[0][:300]


def quantized(python: Path, gguf: Path, type_name: str, cache_dir: Path | None = None) -> Path:
    """``gguf`` requantized to ``type_name`` by llama.cpp itself, cached beside its environment by the
    source's sha256 (the same file every bench run, made once)."""
    from .runtime.files import sha256_file

    out = env_dir(cache_dir).parent / "quantized" / f"{sha256_file(gguf)[:16]}-{type_name.upper()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    proc = subprocess.run([str(python), "-I", str(WORKER), "--quantize", str(gguf), str(partial), type_name],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise LlamaCppUnavailable(f"llama.cpp could not quantize {gguf.name} to {type_name}: {_last_line(proc)}")
    partial.replace(out)  # complete files only: an interrupted quantization is redone
    return out


def cross_check(loaded, windows: list[list[int]], ours: list[np.ndarray], build: bool = False, cache_dir: Path | None = None,
                progress: Callable[[str], None] = lambda m: None) -> dict:
    """Compare the PyTorch model (``ours``: its logits on ``windows``) with llama.cpp on the GGUF it was
    converted from.

    Returns the figures; raises ImplausibleReference when they disagree. When llama.cpp is not built
    and ``build`` is false, returns ``{"checked": False, "why": ...}`` without building.
    """
    from .progress import task
    from .reference import ImplausibleReference, compare_logits, stack
    from .texts import eval_text

    gguf = Path(loaded.identity["source"])
    if not build and not is_built(cache_dir):
        return {"checked": False, "why": "llama.cpp is not built here (--cross-check builds it once)"}
    python = ensure_environment(cache_dir, progress)
    text = " ".join(eval_text().split()[:200])
    with task(progress, f"reference: llama.cpp {VERSION} on {gguf.name} ({len(windows)} windows)"):
        theirs = run_worker(python, gguf, windows, text)
    ref, next_ids = stack(ours, windows)
    other, _ = stack(theirs["logits"], windows)
    keep = next_ids >= 0
    figures = compare_logits(ref, other, None)
    ppl = compare_logits(ref[keep], other[keep], next_ids[keep])
    hf_ids = loaded.tokenizer(text, add_special_tokens=True)["input_ids"]
    result = {"checked": True, "version": VERSION, "top1_agreement": round(figures["top1_agreement"], 4),
              "max_abs_err": round(figures["max_abs_err"], 4), "ppl_pytorch": round(ppl["ppl_ref"], 3),
              "ppl_llama_cpp": round(ppl["ppl_art"], 3),
              "ppl_rel_change": round(ppl["ppl_art"] / ppl["ppl_ref"] - 1, 4),
              "tokens_identical": list(hf_ids) == theirs["text_ids"]}
    problems = []
    if result["top1_agreement"] < MIN_TOP1:
        problems.append(f"top-1 agreement {result['top1_agreement']:.3f} < {MIN_TOP1}")
    if abs(result["ppl_rel_change"]) > MAX_PPL_REL_CHANGE:
        problems.append(f"perplexity {result['ppl_pytorch']:.2f} (PyTorch) vs {result['ppl_llama_cpp']:.2f} (llama.cpp)")
    if not result["tokens_identical"]:
        problems.append("the transformers tokenizer and llama.cpp tokenize the eval text differently")
    if problems:
        raise ImplausibleReference(f"the PyTorch reference disagrees with llama.cpp on {gguf.name}: "
                                   + "; ".join(problems),
                                   hint="transformers' GGUF conversion of this architecture or its tokenizer "
                                        "is off; --no-reference-check exports anyway")
    return result
