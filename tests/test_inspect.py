"""`slm-export inspect`: per-layer divergence of a bundle's quantization (exporter/divergence.py).

The simulation (exporter/simulate.py) must stand for the artifact: its final logits are checked
against each format's real artifact in its runtime. A model with one deliberately broken layer
(outlier weights that make 4-bit groups zero the rest) must be found at that layer.
"""

from __future__ import annotations

import json
import shutil

import pytest

from exporter import divergence
from exporter.errors import SlmExportError
from exporter.formats import ExportOptions, get_format
from exporter.runtime.base import open_runner
from exporter.texts import eval_text, token_windows
from test_cli import run_cli
from tiny_models import make_model_dir

BROKEN_LAYER = 2


def _break_layer(model):
    """Layer 2's MLP: input channels 0 and 32 are dead (their norm weight is 0), and the gate / up
    weights of those channels are outliers 50x the largest. The float model does not see them, but
    a symmetric 4-bit group of 32 scales to the outlier and rounds every other weight of it to zero:
    the layer's MLP is gone once quantized. (down_proj x4 makes that MLP matter to the output.)"""
    layer = model.model.layers[BROKEN_LAYER]
    dead = [0, 32]
    layer.post_attention_layernorm.weight[dead] = 0.0
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
        proj.weight[:, dead] = 50 * proj.weight.abs().max()
    layer.mlp.down_proj.weight.mul_(4.0)


@pytest.fixture(scope="module")
def broken_bundle(tmp_path_factory):
    """The android default (pte int4-weight) of a 4-layer llama with layer 2 broken, built by the CLI."""
    root = tmp_path_factory.mktemp("inspect")
    model = make_model_dir("llama", root / "model", layers=4, edit=_break_layer)
    out = root / "android"
    proc = run_cli("--target", "android", "--model", model, "--out", out, "--no-gate", "--no-latency",
                   "--no-verify", "--no-reference-check", "--max-context", "64", "--inspect")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, out


def test_export_with_inspect_puts_it_in_the_manifest_and_report(broken_bundle):
    _, bundle = broken_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert divergence.most_sensitive(manifest["inspect"], 1)[0]["unit"] == f"layer {BROKEN_LAYER} mlp"
    assert "inspect_s" in manifest["timings_s"]
    html = (bundle / "report.html").read_text()
    assert "Per-layer divergence" in html and "<img" in html


def test_inspect_finds_the_broken_layer(broken_bundle, tmp_path):
    _, bundle = broken_bundle
    report, page = tmp_path / "inspect.json", tmp_path / "inspect.html"
    proc = run_cli("inspect", bundle, "--windows", "2", "--window", "64", "--json", report, "--html", page)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    ranked = divergence.most_sensitive(result, 100)
    assert ranked[0]["unit"] == f"layer {BROKEN_LAYER} mlp", ranked[:3]
    assert ranked[0]["kl"] > 10 * ranked[1]["kl"], ranked[:3]
    assert {r["unit"] for r in ranked} >= {"layer 0 attention", "layer 3 mlp", "lm_head"}
    # the hidden states jump away from the reference after the broken layer, not before
    drift = [d["rel_err"] for d in result["drift"]]  # [embeddings, after layer 0, ...]
    jumps = [b - a for a, b in zip(drift, drift[1:])]
    assert max(range(len(jumps)), key=jumps.__getitem__) == BROKEN_LAYER, drift
    # the artifact ran: the simulation is closer to it than the reference is
    fid = result["fidelity"]
    assert fid["simulation_vs_artifact"]["mean_abs_err"] < 0.5 * fid["reference_vs_artifact"]["mean_abs_err"], fid
    assert f"layer {BROKEN_LAYER} mlp" in proc.stdout and "hidden-state drift" in proc.stdout
    html = page.read_text()
    assert "<img" in html and "per-layer sensitivity" in html


def test_inspect_refuses_what_it_cannot_check(broken_bundle, tmp_path):
    """A bundle whose model is not where the manifest says, a tampered bundle: one message, exit != 0."""
    model, bundle = broken_bundle
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    hidden = model.with_name("model-away")
    model.rename(hidden)
    try:
        proc = run_cli("inspect", moved, "--no-artifact")
    finally:
        hidden.rename(model)
    assert proc.returncode != 0 and "pass --model" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    config = model / "config.json"  # a folder changed after the export: its sha256 differs
    original = config.read_text()
    config.write_text(original.replace("{", '{"changed_after_export": true, ', 1))
    try:
        proc = run_cli("inspect", bundle, "--no-artifact")
    finally:
        config.write_text(original)
    assert proc.returncode != 0 and "sha256 differs" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    artifact = next(p for p in moved.iterdir() if p.suffix == ".pte")
    artifact.write_bytes(artifact.read_bytes()[:-16] + b"\0" * 16)
    proc = run_cli("inspect", moved, "--model", model, "--no-artifact")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr


def test_a_recipe_it_cannot_simulate_is_refused(tiny_loaded, tiny_model_dir, tmp_path):
    with pytest.raises(SlmExportError, match="cannot simulate"):
        divergence.simulated_schemes("onnx", "int8-static", tiny_loaded("llama"), 32, {})
    # --inspect at export: refused before any export work, nothing written
    out = tmp_path / "static"
    proc = run_cli("--target", "rpi", "--recipe", "int8-static", "--model", tiny_model_dir("llama"), "--out", out,
                   "--inspect")
    assert proc.returncode != 0 and "cannot simulate" in proc.stderr and "export:" not in proc.stderr, proc.stderr
    assert not out.exists()


CASES = [("llama", "onnx", "int4-weight"), ("llama", "onnx", "int8-dynamic"), ("llama", "pte", "int4-weight"),
         ("llama", "pte", "int8-dynamic"), ("llama", "tflite", "int4-weight"), ("llama", "tflite", "int8-dynamic"),
         ("gemma3", "onnx", "int4-weight"), ("gemma3", "tflite", "int4-weight"),
         pytest.param("gemma3", "pte", "int4-weight", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,fmt,recipe", CASES)
def test_simulation_matches_the_artifact(arch, fmt, recipe, tiny_loaded, tmp_path):
    """Each format's simulated quantization against its real artifact's final logits: at most half as far
    from the artifact as the float reference is (onnx: ~1e-4 of it; pte int4 ~0.44x, XNNPACK's own
    rounding of activations and bf16 group scales is not reproduced bit for bit)."""
    loaded = tiny_loaded(arch)
    art = get_format(fmt).build(loaded, recipe, ExportOptions(max_context=64), tmp_path)
    windows = token_windows(loaded.tokenizer, eval_text(), 64, 2)
    schemes = divergence.simulated_schemes(fmt, recipe, loaded, 32, art.spec)
    assert schemes and all(s.quantizes for s in schemes.values())
    fid = divergence.analyse(loaded, schemes, windows, open_runner(tmp_path, art.spec, verify_files=False))["fidelity"]
    sim, ref = fid["simulation_vs_artifact"], fid["reference_vs_artifact"]
    assert sim["mean_abs_err"] < 0.5 * ref["mean_abs_err"], fid
    assert sim["top1_agreement"] >= ref["top1_agreement"], fid
