"""The shared contracts without exporting anything: runtime.json's tensor names, the one error
condenser and the one quiet-output helper."""

from __future__ import annotations

import os
import sys

import pytest

from exporter.errors import condense
from exporter.quiet import quiet
from exporter.runtime.base import RunnerError, check_spec
from exporter.runtime.spec import contract, contract_fields, contract_problem, roles

LAYERS = 2


def onnx_spec(**extra) -> dict:
    return {"format": "onnx", "artifact": "model.onnx", "kind": "causal-lm", "num_layers": LAYERS,
            **contract_fields("onnx", "causal-lm", LAYERS), **extra}


def test_each_format_names_its_tensors_once():
    onnx = contract_fields("onnx", "causal-lm", LAYERS)
    assert onnx["inputs"] == ["input_ids", "attention_mask", "position_ids"] and onnx["outputs"] == ["logits"]
    assert onnx["cache"]["inputs"] == [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    assert onnx["cache"]["outputs"][0] == "present.0.key" and onnx["cache"]["max_context"] is None
    tflite = contract_fields("tflite", "causal-lm", LAYERS, 64, [16, 32])
    assert tflite["signatures"] == {"prefill_16": 16, "prefill_32": 32, "decode": 1}
    # LiteRT-LM's cache names (its executor finds the cache by the kv_cache_k_ / kv_cache_v_ prefix)
    assert tflite["cache"]["inputs"] == tflite["cache"]["outputs"] == ["kv_cache_k_0", "kv_cache_v_0",
                                                                       "kv_cache_k_1", "kv_cache_v_1"]
    pte = contract_fields("pte", "causal-lm", LAYERS, 64)
    assert pte["method"] == "forward" and pte["inputs"] == ["tokens", "input_pos"] and pte["cache"]["inputs"] == []
    assert contract_fields("tflite", "encoder", lengths=[32, 64])["signatures"] == {"encode_32": 32, "encode_64": 64}
    assert contract_fields("onnx", "encoder")["cache"] is None
    assert roles(onnx_spec()) == {"tokens": "input_ids", "mask": "attention_mask", "positions": "position_ids",
                                  "logits": "logits"}


def test_bundles_from_before_the_contract_get_the_names_they_were_exported_with():
    old = {"format": "onnx", "artifact": "model.onnx", "kind": "causal-lm", "num_layers": LAYERS}
    assert contract(old)["cache"] == onnx_spec()["cache"] and contract_problem(old) is None
    old_tflite = {"format": "tflite", "kind": "encoder", "signature": "encode", "max_context": 128}
    assert contract(old_tflite)["signatures"] == {"encode": 128}
    # a tflite causal LM from before the contract was built with k_<i> / v_<i> (not LiteRT-LM's names)
    old_lm = {"format": "tflite", "kind": "causal-lm", "num_layers": LAYERS, "max_context": 64,
              "signatures": {"prefill_8": 8, "decode": 1}}
    assert contract(old_lm)["cache"]["inputs"] == ["k_0", "v_0", "k_1", "v_1"] and contract_problem(old_lm) is None


@pytest.mark.parametrize("change, message", [
    ({"contract": True}, "contract version"),
    ({"inputs": "input_ids"}, "must be a list"),
    ({"inputs": ["input_ids", "attention_mask", "x" * 200]}, "not a plain tensor name"),
    ({"cache": {**onnx_spec()["cache"], "inputs": ["k"] * 3}}, "for 2 layers"),
    ({"cache": {**onnx_spec()["cache"], "max_context": -1}}, "max_context"),
    ({"format": "tflite", "signatures": {"decode": "1"}}, "not a count"),
    ({"format": "tflite", "signatures": {"a/b": 1}}, "not a plain name"),
])
def test_check_spec_refuses_a_malformed_contract(change, message):
    spec = onnx_spec(**change)
    if change.get("format") == "tflite":
        spec.update({k: v for k, v in contract_fields("tflite", "causal-lm", LAYERS, 64, [8]).items()
                     if k != "signatures"})
    with pytest.raises(RunnerError, match=message):
        check_spec(spec)
    check_spec(onnx_spec())  # the well-formed one passes


def test_jetson_profiles_use_the_spec_names():
    from targets.jetson import shape_profile

    spec = onnx_spec(num_kv_heads=2, head_dim=16)
    spec["cache"] = {**spec["cache"], "inputs": ["cache_a", "cache_b", "cache_c", "cache_d"]}
    assert shape_profile(spec, 3, 1).split(",")[3:5] == ["cache_a:1x2x3x16", "cache_b:1x2x3x16"]


def test_condense_picks_the_informative_line():
    onnx_style = RuntimeError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m\n"
                              "- Modify the model code\n\n## Exception summary\n\n"
                              "<class 'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>: "
                              "Could not guard on data-dependent expression\n\nconsider using ...")
    assert condense(onnx_style, typed=False) == "GuardOnDataDependentSymNode: Could not guard on data-dependent expression"
    mlir = RuntimeError('Verification failed:\nloc("model.layers.0.mlp"): error: \'tfl.gather\' op bad operand\nmore')
    assert condense(mlir) == "RuntimeError: error: 'tfl.gather' op bad operand"  # location dropped
    assert condense(ValueError("first\nsecond"), limit=10) == "ValueError"[:10]
    assert condense(ValueError("  \n")) == "ValueError" and condense(KeyError(), typed=False) == "KeyError"
    assert condense(OSError("x" * 1000), limit=300, typed=False) == "x" * 300


def test_quiet_catches_python_and_descriptor_output():
    with quiet() as out:
        print("from python")
        sys.stderr.write("to stderr\n")
        os.write(1, b"from c++ on fd 1\n")
        os.write(2, b"from c++ on fd 2\n")
    for text in ("from python", "to stderr", "from c++ on fd 1", "from c++ on fd 2"):
        assert text in out.text
    with quiet(env={"SLM_EXPORT_TEST_QUIET": "n"}):
        assert os.environ["SLM_EXPORT_TEST_QUIET"] == "n"
    assert "SLM_EXPORT_TEST_QUIET" not in os.environ
