"""Every model family on every format, on its tiny config: roles, export, parity against PyTorch.

The matrix is ``exporter.families.TEST_MATRIX`` (what `slm-export models` reports as covered). Four fp32 cells on
ONNX and TFLite (``FAST_CELLS``) are the fast tier; every other cell is behind ``slow``.
A family a format refuses must be refused before any work, with the family's reason.
"""

from __future__ import annotations

import pytest
import torch

from exporter import parity
from exporter.errors import UnsupportedRecipeError
from exporter.families import FAMILIES, ROLES, TEST_MATRIX
from exporter.formats import ExportOptions, get_format
from exporter.runtime.base import open_runner

FAMILY_NAMES = sorted(f.name for f in FAMILIES)
CELLS = [(fam, fmt, recipe) for fam in FAMILY_NAMES for fmt, recipes in TEST_MATRIX.items() for recipe in recipes]


# The fast tier (`pytest -m "not slow"`, minutes) exports one decoder and one encoder family per fast
# format; every other cell is behind ``slow`` (CI runs all of them).
FAST_CELLS = {("llama", "onnx", "fp32"), ("gemma3", "tflite", "fp32"), ("bert", "onnx", "fp32"),
              ("distilbert", "tflite", "fp32")}


def _param(fam, fmt, recipe):
    slow = (fam, fmt, recipe) not in FAST_CELLS
    return pytest.param(fam, fmt, recipe, marks=[pytest.mark.slow] if slow else [], id=f"{fam}-{fmt}-{recipe}")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_linear_layer_has_a_role(name, tiny_loaded):
    """The family's role patterns cover its model: every linear layer has a role, the plan's key roles exist."""
    fam = FAMILIES.get(name)
    loaded = tiny_loaded(name)
    assert loaded.family is fam and loaded.kind == fam.kind
    roles = {}
    for path, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            roles[path] = fam.role_of(path)
    unassigned = [p for p, r in roles.items() if r is None and not p.endswith(("pooler.dense",))]
    if name == "mobilebert":  # bottleneck and stacked-FFN linears have no role of the shared vocabulary
        unassigned = [p for p in unassigned if "bottleneck" not in p and ".ffn." not in p
                      and "embedding_transformation" not in p]
    assert not unassigned, f"{name}: linears without a role: {unassigned[:5]}"
    found = set(roles.values())
    assert "down" in found and ({"q", "k", "v"} <= found or "qkv" in found), found
    assert fam.num_layers(loaded.model) == loaded.config.get_text_config().num_hidden_layers
    assert fam.modules(loaded.model, "embed"), f"{name}: no embedding module matched"
    if fam.kind == "causal-lm":
        assert fam.role_of("lm_head") == "lm_head"
    assert set(fam.layer_roles) | set(fam.model_roles) <= set(ROLES)


@pytest.mark.parametrize("fam, fmt, recipe", [_param(*c) for c in CELLS])
def test_family_exports_and_matches_pytorch(fam, fmt, recipe, tiny_loaded, tmp_path):
    """Export the tiny model and check parity with the recipe's own thresholds (the gate users get)."""
    loaded = tiny_loaded(fam)
    family = FAMILIES.get(fam)
    format_ = get_format(fmt)
    reason = family.refusal(fmt)
    options = ExportOptions(max_context=128, prefill_lengths=(16,))
    if reason:
        with pytest.raises(UnsupportedRecipeError, match="cannot export the"):
            format_.check(loaded.kind, recipe, family)
        return
    art = format_.build(loaded, recipe, options, tmp_path)
    runner = open_runner(tmp_path, art.spec, verify_files=False)
    result = parity.evaluate(loaded, runner, recipe, window=48, max_windows=2, greedy_tokens=8)
    assert result["passed"], (result["failures"], {k: v for k, v in result["metrics"].items()
                                                    if not isinstance(v, str)})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi", "android"])
def test_encoder_on_each_device_target(target, tiny_model_dir, tmp_path):
    """An encoder through the whole CLI on a device target: parity by cosine, latency per call, no crash
    in the budget check (encoders have no decode speed or TTFT)."""
    import json

    from test_cli import run_cli

    out = tmp_path / target
    proc = run_cli("--target", target, "--model", tiny_model_dir("bert"), "--out", out, "--decode-tokens", "4",
                   "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["family"] == "bert" and manifest["model"]["kind"] == "encoder"
    assert manifest["parity"]["passed"] and "cosine_min" in manifest["parity"]["metrics"]
    assert "encode_ms" in manifest["latency"]["latency"] and manifest["budget_failures"] == []
    assert "hidden-state error" in (out / "report.md").read_text()


CLASSIFIER_CELLS = [("bert", "onnx", "fp32"), ("bert", "tflite", "fp32"), ("distilbert", "onnx", "fp32"),
                    ("mobilebert", "tflite", "fp32"), ("bert", "pte", "fp32"), ("bert", "onnx", "int8-dynamic"),
                    ("bert", "tflite", "int8-dynamic"), ("distilbert", "pte", "int4-weight")]


@pytest.mark.parametrize("fam, fmt, recipe", [_param(*c) for c in CLASSIFIER_CELLS])
def test_sequence_classifier_exports_label_logits(fam, fmt, recipe, tiny_loaded, tmp_path):
    """An encoder family's ...ForSequenceClassification exports its label logits and is gated on the
    labels it picks over many short texts."""
    loaded = tiny_loaded(f"{fam}-classifier")
    assert loaded.kind == "sequence-classifier" and loaded.family.name == fam
    art = get_format(fmt).build(loaded, recipe, ExportOptions(max_context=64, prefill_lengths=(16,)), tmp_path)
    assert art.spec["kind"] == "sequence-classifier" and art.spec["outputs"] == ["logits"]
    assert art.spec["labels"] == ["play", "pause", "skip"]
    runner = open_runner(tmp_path, art.spec, verify_files=False)
    assert runner.encode([5, 6, 7]).shape == (3,)
    result = parity.evaluate(loaded, runner, recipe)
    assert result["passed"], result
    assert result["metrics"]["texts"] >= 40 and result["metrics"]["label_agreement"] >= 0.9


@pytest.mark.slow
def test_sequence_classifier_through_the_cli(tiny_model_dir, tmp_path):
    """The whole CLI on rpi: the manifest, runtime.json and report speak of labels; the device-side
    runner's --parity check reads the shipped label logits."""
    import json
    import subprocess
    import sys

    from test_cli import ROOT, run_cli

    out = tmp_path / "rpi"
    proc = run_cli("--target", "rpi", "--model", tiny_model_dir("bert-classifier"), "--out", out, "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "sequence-classifier" and manifest["parity"]["passed"]
    assert json.loads((out / "runtime.json").read_text())["labels"] == ["play", "pause", "skip"]
    assert "label agreement" in (out / "report.md").read_text()
    device = subprocess.run([sys.executable, "-m", "exporter.runtime.main", str(out), "--parity", "--json",
                             "--repeats", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert device.returncode == 0, device.stderr[-2000:]
    checked = json.loads(device.stdout.strip().splitlines()[-1])["parity"]
    assert checked["max_abs_err"] < 0.05 and checked["cosine_min"] > 0.99, checked


def test_decoder_classifier_is_refused_with_the_reason(tmp_path):
    from transformers import LlamaForSequenceClassification

    from exporter.families import FAMILIES
    from exporter.loading import load_model
    from tiny_models import train_tokenizer

    config = FAMILIES.get("llama").tiny_config()
    config.num_labels, config.pad_token_id = 2, 0
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    train_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedRecipeError, match="sequence classification on a llama decoder is not supported"):
        load_model(str(tmp_path))


def test_max_context_defaults_to_the_models_positions(tmp_path, tiny_loaded):
    from exporter.pipeline import DEFAULT_MAX_CONTEXT, fit_context

    loaded = tiny_loaded("llama")
    assert fit_context(loaded, None) == (DEFAULT_MAX_CONTEXT, None)
    assert fit_context(loaded, 64) == (64, None)
    cfg = loaded.config
    saved = cfg.max_position_embeddings
    cfg.max_position_embeddings = 256
    try:
        context, note = fit_context(loaded, None)
        assert context == 256 and "the model's own positions" in note
    finally:
        cfg.max_position_embeddings = saved


def test_unsupported_architecture_names_the_closest(tmp_path, tiny_model_dir):
    import json
    import shutil

    from exporter.errors import ModelLoadError
    from exporter.loading import load_model

    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "qwen3_moe"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model))
    assert "unsupported architecture 'qwen3_moe'" in str(err.value) and "'qwen3'" in err.value.hint


def test_recipes_explain_and_models_listing(tiny_model_dir):
    from test_cli import run_cli

    proc = run_cli("recipes", "--explain", "int4-weight", "--format", "pte", "--model", tiny_model_dir("bert"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "encoder.layer.{0..1}.output.dense" in proc.stdout and "int8 weights per channel" in proc.stdout
    listing = run_cli("models")
    assert listing.returncode == 0 and "gemma3_text" in listing.stdout and "mobilebert" in listing.stdout
    table = run_cli("recipes")
    assert "--target mcu" in table.stdout  # int8-full is tflite's, through the mcu target
