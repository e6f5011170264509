"""Accuracy-aware mixed precision (--max-ppl-change / --min-top1): the search, its rules, its refusals."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from exporter.errors import SlmExportError
from exporter.mixed_precision import Budget, parse_ppl_change
from exporter.recipes import Rule, active_overrides, get_recipe, layer_rules, overriding

NO_EXTRAS = ("--no-latency", "--no-verify", "--no-reference-check")


def test_budget_reads_percent_or_fraction_and_refuses_nonsense():
    assert parse_ppl_change("2%") == pytest.approx(0.02) and parse_ppl_change("0.02") == pytest.approx(0.02)
    for bad in ("two", "0", "-1%"):
        with pytest.raises(SlmExportError):
            parse_ppl_change(bad)
    budget = Budget(max_ppl_change=0.02, min_top1=0.95)
    assert budget.misses({"ppl_rel_change": -0.019, "top1_agreement": 0.95}) == []
    assert len(budget.misses({"ppl_rel_change": 0.021, "top1_agreement": 0.949})) == 2
    assert not Budget() and Budget(min_top1=0.9)


def test_override_rules_take_their_modules_first_and_nest(tiny_loaded):
    loaded = tiny_loaded("llama")
    recipe = get_recipe("int4-weight")
    down = "model.layers.0.mlp.down_proj"
    keep = Rule("*", "float", modules=(down, "model.layers.1.self_attn.q_proj"))
    plain = layer_rules(recipe, "pte", loaded.family, loaded.model)
    assert plain[down][1].weights == "int8" and plain["model.layers.1.self_attn.q_proj"][1].weights == "int4"
    with overriding([keep]):
        rules = layer_rules(recipe, "pte", loaded.family, loaded.model)
        assert rules[down][1] is keep and rules["model.layers.1.self_attn.q_proj"][1] is keep
        assert rules["model.layers.1.mlp.down_proj"][1].weights == "int8"  # not listed: the plan's rule
        # an exporter's wrapper module prefixes the path (ONNX scopes: "model." + the module path)
        assert recipe.rule_for("onnx", "down", True, "causal-lm", "model." + down) is keep
        inner = Rule("*", "int8", "group", "float", modules=(down,))
        with overriding([inner]):
            assert active_overrides() == (inner, keep)
        assert active_overrides() == (keep,)
    assert active_overrides() == ()
    assert Rule.from_dict(keep.as_dict()) == keep


@pytest.mark.slow
def test_pte_budget_keeps_the_most_sensitive_layers_float(tiny_model_dir, tmp_path):
    """android int4-weight on a tiny Llama: a budget tighter than the plan's figures is met by keeping
    a few units float32; the plan is recorded, shipped and simulated by inspect."""
    from exporter import divergence
    from exporter.loading import load_model

    out = tmp_path / "android"
    proc = run_cli("--target", "android", "--model", tiny_model_dir("llama"), "--out", out, *NO_EXTRAS,
                   "--max-ppl-change", "0.03%")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    mp = manifest["mixed_precision"]
    assert abs(mp["plan"]["ppl_rel_change"]) > 0.0003, "the plan itself must miss the budget for this test"
    assert mp["result"] == "met" and mp["rounds"] and mp["keep"] == "float"
    assert 0 < len(mp["kept"]) < len(mp["ranking"])  # some units, not all
    assert abs(manifest["parity"]["metrics"]["ppl_rel_change"]) <= 0.0003
    assert mp["rounds"][-1]["measured"]["ppl_rel_change"] == pytest.approx(
        manifest["parity"]["metrics"]["ppl_rel_change"], abs=1e-6)
    ranked = [u["unit"] for u in mp["ranking"]]
    assert mp["kept"] == ranked[:len(mp["kept"])]  # the most sensitive per byte first
    spec = json.loads((out / "runtime.json").read_text())
    kept_modules = set(spec["plan_overrides"][0]["modules"])
    assert kept_modules and spec["plan_overrides"][0]["weights"] == "float"
    # inspect simulates what was built: the kept layers are float in the bundle's schemes
    loaded = load_model(str(tiny_model_dir("llama")))
    schemes = divergence.simulated_schemes("pte", "int4-weight", loaded, 32, spec)
    assert kept_modules.isdisjoint(schemes) and schemes
    assert "Accuracy budget (ppl within ±0.03%): met" in (out / "report.md").read_text()
    assert "accuracy budget (ppl within ±0.03%): met" in proc.stdout


@pytest.mark.slow
def test_onnx_budget_out_of_reach_writes_nothing_or_keeps_the_record(tiny_model_dir, tmp_path):
    """rpi int8-dynamic: a budget no artifact meets (a perplexity change of 1e-9, under float32's own
    rounding) is one clear error and nothing written; with --no-gate, the last rebuild (the kept layers
    float32 MatMuls, the rest 8-bit MatMulNBits) and the record of every round."""
    import onnx

    out = tmp_path / "rpi"
    args = ("--target", "rpi", "--model", tiny_model_dir("llama"), *NO_EXTRAS, "--max-ppl-change", "0.0000001%")
    proc = run_cli(*args, "--out", out)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "accuracy budget was not met" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".rpi.partial-*"))

    proc = run_cli(*args, "--out", out, "--no-gate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    mp = json.loads((out / "manifest.json").read_text())["mixed_precision"]
    assert mp["result"] == "not met" and mp["rounds"] and mp["keep"] == "float"
    spec = json.loads((out / "runtime.json").read_text())
    kept = {m for rule in spec["plan_overrides"] for m in rule["modules"] if rule["weights"] == "float"}
    linears = {u for r in mp["ranking"] for u in [r["unit"]]}  # every unit ranked
    assert kept and len(mp["kept"]) == len(mp["rounds"][-1]["units"]) and set(mp["kept"]) <= linears
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    kept_linears = [m for m in kept if "embed" not in m]
    assert len(nbits) == 15 - len(kept_linears)  # tiny Llama: 2 layers x 7 linears + lm_head


def test_budget_is_refused_before_any_work_where_no_finer_step_exists(tiny_model_dir, tmp_path):
    for args, said in (
        (("--target", "rpi", "--format", "tflite"), "no finer step for tflite int8-dynamic"),
        (("--target", "host", "--format", "onnx", "--recipe", "int8-static"), "no finer step for onnx int8-static"),
        (("--target", "mcu",), "has no accuracy budget search"),
    ):
        proc = run_cli(*args, "--model", tiny_model_dir("llama"), "--out", tmp_path / "o", "--min-top1", "0.99",
                       timeout=120)
        assert proc.returncode != 0 and said in proc.stderr, (args, proc.stderr[-1500:])
        assert not (tmp_path / "o").exists()
    proc = run_cli("--target", "rpi", "--out", tmp_path / "o", "--max-ppl-change", "lots", timeout=60)
    assert proc.returncode == 2 and "--max-ppl-change" in proc.stderr and "not a number" in proc.stderr
