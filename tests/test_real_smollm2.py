"""The real SmolLM2-135M-Instruct, embedded default, end to end through the CLI (offline).

Slow (a few minutes on 2 cores): the GGUF is converted once into the model cache, then exported.
"""

from __future__ import annotations

import json

import pytest

from test_cli import run_cli

pytestmark = pytest.mark.slow


def test_rpi_default_bundle_of_the_embedded_model(real_smollm2_bundle):
    """`slm-export --target rpi` with no --model: ONNX int8-dynamic, parity gate passed, measured."""
    out = real_smollm2_bundle("rpi-onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["embedded"] == "smollm2-135m-instruct"
    assert manifest["model"]["num_parameters"] > 130e6
    assert (manifest["format"], manifest["recipe"]) == ("onnx", "int8-dynamic")
    metrics = manifest["parity"]["metrics"]
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert metrics["top1_agreement"] >= 0.75 and 10 < metrics["ppl_ref"] < 60
    assert "Paris" in metrics["greedy_reference_text"]
    assert manifest["latency"]["latency"]["decode_tok_s"] > 1
    assert manifest["artifact"]["bytes"] < 0.5 * 540e6  # int8 is well under the 540 MB fp32 graph
    genai = runtime_row(manifest, "onnxruntime-genai")  # the bundle drops into onnxruntime-genai
    assert genai["status"] == "ok" and genai["same_as_ours"] and genai["decode_tokens_per_s"] > 1, genai


def test_fp32_export_generates_identical_greedy_tokens(tmp_path):
    out = tmp_path / "host"
    proc = run_cli("--target", "host", "--format", "onnx", "--recipe", "fp32", "--out", out, "--no-latency", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["parity"]["metrics"]
    assert metrics["greedy_identical"] and metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_err"] < 1e-2
    assert "Paris" in metrics["greedy_artifact_text"]


def test_rpi_tflite_bundle_of_the_embedded_model(real_smollm2_bundle):
    """`--format tflite` on the rpi target: LiteRT int8-dynamic with prefill/decode signatures."""
    out = real_smollm2_bundle("rpi-tflite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["recipe"]) == ("tflite", "int8-dynamic")
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert manifest["parity"]["metrics"]["top1_agreement"] >= 0.78
    assert manifest["latency"]["runtime"] in ("ai_edge_litert", "ai-edge-litert", "tflite_runtime")
    assert manifest["artifact"]["bytes"] < 0.4 * 540e6


def test_android_default_pte_of_the_embedded_model(tmp_path):
    """`slm-export --target android`: ExecuTorch int4-weight (8da4w, lm_head 8-bit, the GGUF's 4-bit blocks
    carried) on XNNPACK, gate passed."""
    out = tmp_path / "android"
    proc = run_cli("--target", "android", "--out", out, "--decode-tokens", "8", "--repeats", "1", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["recipe"]) == ("pte", "int4-weight")
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert manifest["latency"]["runtime"] == "executorch"
    assert manifest["artifact"]["bytes"] < 0.45 * 652e6  # fp32 .pte is 652 MB
    # every linear of the Q4_1 GGUF keeps its blocks, and the gate was the tighter source-grid one
    source = json.loads((out / "runtime.json").read_text())["source_grid"]
    assert len(source["carried"]) == 30 * 7 and not source["finer_than_4bit"], source
    from exporter.recipes import get_recipe

    assert manifest["parity"]["thresholds"]["top1_min"] == get_recipe("int4-weight").source_grid_thresholds.top1_min
    settings = json.loads((out / "android_llm.json").read_text())
    assert settings["model"] == "model.pte" and settings["user_prompt_template"] and (out / "tokenizer.json").exists()
    runner = runtime_row(manifest, "executorch TextLLMRunner")  # ExecuTorch's own LLM runner, unchanged bundle
    assert runner["status"] == "ok" and runner["same_as_ours"] and runner["decode_tokens_per_s"] > 1, runner


def runtime_row(manifest: dict, name: str) -> dict:
    """The verify row of runtime ``name`` in the manifest written by the export."""
    rows = {row["runtime"]: row for row in manifest["runtimes"]}
    assert rows["slm-export"]["status"] == "ok", rows
    return rows[name]
