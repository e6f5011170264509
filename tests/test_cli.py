"""The slm-export command: a full bundle on a tiny model, and every bad input the spine promises."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.cli import FORMAT_CHOICES, cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=900):
    """Run the real console entry point in a subprocess (as a user would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def rpi_bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "rpi"
    proc = run_cli("--target", "rpi", "--model", tiny_model_dir("llama"), "--out", out,
                   "--decode-tokens", "8", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_rpi_bundle_is_complete_and_self_describing(rpi_bundle):
    out, proc = rpi_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["target"], manifest["format"], manifest["recipe"]) == ("rpi", "onnx", "int8-dynamic")
    for name in ("model.onnx", "runtime.json", "tokenizer.json", "tokenizer_config.json", "report.md", "report.html"):
        assert (out / name).exists(), name
    assert set(manifest["files"]) >= {"model.onnx", "runtime.json", "tokenizer.json"}
    assert manifest["parity"]["passed"] and manifest["parity"]["metrics"]["top1_agreement"] >= 0.8
    lat = manifest["latency"]["latency"]
    assert lat["decode_tok_s"] > 0 and lat["ttft_ms"] > 0 and lat["peak_rss_mb"] > 0
    assert lat["per_token_ms"]["p50"] <= lat["per_token_ms"]["p99"]
    assert manifest["latency"]["runtime"] == "onnxruntime"
    assert manifest["versions"]["onnxruntime"] and manifest["model"]["model_type"] == "llama"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    report = (out / "report.md").read_text()
    assert "Parity against PyTorch" in report
    size, fp32 = manifest["artifact"]["bytes"], 4 * manifest["model"]["num_parameters"]
    assert f"{size / fp32:.2f}x the {fp32 / 1e6:.1f} MB of fp32 weights" in report
    assert "parity onnx / int8-dynamic: passed" in proc.stdout
    assert not list(out.parent.glob(".rpi.partial-*"))


def test_export_output_reads_well_in_a_log(rpi_bundle):
    """Into a pipe: timestamped stage lines, no control codes or \\r bars, none of the known library
    noise, and the summary a person acts on (on stdout, after the tables)."""
    from exporter.terminal import is_noise

    _, proc = rpi_bundle
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if is_noise(line)]
    for stage in ("load: ", "export: ONNX graph", "validate: parity windows", "measure: latency"):
        assert re.search(rf"^ +\d+\.\ds {stage}", proc.stderr, re.M), stage
    summary = " ".join(proc.stdout.split("summary", 1)[1].split())
    for label in ("bundle", "artifact", "parity", "latency", "budgets", "took"):
        assert label in summary, label
    assert "fp32 weights" in summary and "passed" in summary and "tok/s decode" in summary


def test_manifest_hashes_match_files(rpi_bundle):
    from exporter.bundle import verify

    out, _ = rpi_bundle
    assert verify(out) == []
    original = (out / "runtime.json").read_text()
    (out / "runtime.json").write_text(original + " ")
    try:
        assert [p.split(":")[0] for p in verify(out)] == ["runtime.json"]
    finally:
        (out / "runtime.json").write_text(original)
    assert verify(out) == []


def test_existing_output_refused_without_force(rpi_bundle, tiny_model_dir):
    out, _ = rpi_bundle
    proc = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", out)
    assert proc.returncode == 1
    assert "exists and is not empty" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipes_command_lists_formats_and_targets():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0, result.output
    for word in ("int8-dynamic", "int4-weight", "onnx", "rpi", "host"):
        assert word in result.output


def test_format_choices_match_registry():
    from exporter.formats import FORMATS

    assert set(FORMAT_CHOICES) == set(FORMATS.names())


@pytest.mark.parametrize("option,value", [("--target", "toaster"), ("--recipe", "int3"), ("--format", "gguf")])
def test_unknown_choice_is_clicks_error(option, value, tmp_path):
    args = ["--target", "host", "--out", str(tmp_path / "o")]
    args = [a if a != "host" or option != "--target" else value for a in args]
    if option != "--target":
        args += [option, value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output


def test_recipe_the_format_cannot_do(tmp_path):
    result = CliRunner().invoke(cli, ["--target", "host", "--format", "onnx", "--recipe", "int8-full", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "format 'onnx' cannot do recipe 'int8-full'" in result.output
    assert not (tmp_path / "o").exists()


def test_format_the_target_cannot_run(tmp_path):
    result = CliRunner().invoke(cli, ["--target", "rpi", "--format", "pte", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "does not run format 'pte'" in result.output


def test_target_is_resolved_once(tmp_path, monkeypatch):
    """The CLI resolves the plan and hands it to run(), which follows it instead of resolving again."""
    from exporter import pipeline

    calls = []
    real = pipeline.resolve
    monkeypatch.setattr(pipeline, "resolve", lambda req: calls.append(req) or real(req))
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    result = CliRunner().invoke(cli, ["--target", "host", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "stop here" in result.output
    assert len(calls) == 1


def test_missing_model_path(tmp_path):
    proc = run_cli("--target", "host", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["--target", "host", "--model", str(tiny_model_dir("llama")), "--out", str(blocker / "bundle")])
    assert result.exit_code == 1 and "cannot write to" in result.output


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--target", "host", "--model", tmp_path / "nope", "--out", tmp_path / "o", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_parity_gate_failure_writes_nothing(tiny_loaded, tmp_path, monkeypatch):
    """A recipe whose thresholds cannot hold fails with a table naming the metric, and publishes nothing."""
    from exporter import pipeline, recipes
    from exporter.errors import ParityGateFailed

    strict = recipes.Recipe("int8-dynamic", "test", recipes.Thresholds(top1_min=1.01))
    monkeypatch.setitem(recipes.RECIPES._entries, "int8-dynamic", strict)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: tiny_loaded("llama"))
    req = pipeline.ExportRequest(target="host", out=tmp_path / "o", format="onnx", recipe="int8-dynamic", measure=False)
    with pytest.raises(ParityGateFailed) as err:
        pipeline.run(req)
    assert "top1_agreement" in str(err.value) and "top-1 agreement" in str(err.value)
    assert err.value.exit_code == 3
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
    req.gate = False
    manifest = pipeline.run(req)
    assert manifest["parity"]["passed"] is False and (tmp_path / "o" / "model.onnx").exists()


def test_interrupt_leaves_no_half_bundle(tiny_model_dir, tmp_path):
    """Ctrl-C during the export exits 130 and leaves neither the bundle nor its staging folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", "--target", "host", "--model",
                             str(tiny_model_dir("llama")), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".b.partial-*/model*.onnx")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".b.partial-*")), "the export never reached the staging folder"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


def test_device_runner_checks_shipped_reference(rpi_bundle):
    """The device-side runner alone (numpy + onnxruntime) re-checks parity from the bundle's reference, on the
    gate's evaluation set: same windows, same positions, so on the same runtime the same top-1 and perplexity."""
    out, _ = rpi_bundle
    proc = subprocess.run([sys.executable, "-m", "exporter.runtime.main", str(out), "--parity", "--decode-tokens", "4",
                           "--repeats", "1", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    device, gate = result["parity"], json.loads((out / "manifest.json").read_text())["parity"]["metrics"]
    assert device["windows"] == gate["windows"] == 8 and device["positions"] == gate["positions"] >= 8 * 100
    assert abs(device["top1_agreement"] - gate["top1_agreement"]) <= 1 / gate["positions"], (device, gate)
    assert device["ppl_ref"] == pytest.approx(gate["ppl_ref"], rel=1e-5)
    assert device["ppl_rel_change"] == pytest.approx(gate["ppl_rel_change"], abs=1e-4)
    assert device["greedy_identical"] == gate["greedy_identical"]  # the same 32 tokens
    assert device["abs_err_positions"] == gate["positions"] // gate["windows"]  # the first window's full logits
    assert result["runtime"] == "onnxruntime" and result["device"]["cpu_count"] >= 1
