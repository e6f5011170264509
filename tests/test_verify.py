"""Bundles in the field's runtimes (exporter/verify): onnxruntime-genai on ONNX bundles, ExecuTorch's
TextLLMRunner on .pte bundles, run for real on tiny random-weight models exported by the real CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from exporter import verify
from exporter.cli import cli
from exporter.verify import executorch_runner, onnxruntime_genai, slm_export
from test_cli import run_cli


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    """(family, target) -> bundle folder: tiny llama and gemma3, rpi (ONNX int8) and android (pte int4)."""
    made = {}

    def get(family: str, target: str):
        if (family, target) not in made:
            out = tmp_path_factory.mktemp("verify") / f"{family}-{target}"
            proc = run_cli("--target", target, "--model", tiny_model_dir(family), "--out", out, "--no-latency",
                           "--no-reference-check")
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[family, target] = out
        return made[family, target]

    return get


def varied_cases(bundle, n_prompts: int = 8, n_tokens: int = 3) -> list[tuple[list[int], list[int]]]:
    """Prompts (growing prefixes of the eval window) and our runner's greedy tokens after each.

    A tiny random model repeats its last token once it generates (its lm_head is near the embedding),
    so one long continuation would be one token repeated; the first tokens after different prompts
    vary, which is what makes two runtimes' agreement mean something (asserted below).
    """
    with np.load(bundle / "parity_reference.npz") as ref:
        ids = ref["ids"].tolist()
    manifest = json.loads((bundle / "manifest.json").read_text())
    cases = [(ids[:k], slm_export._generate(bundle, manifest, ids[:k], n_tokens).tokens)
             for k in range(8, 8 + 3 * n_prompts, 3)]
    assert len({t for _, tokens in cases for t in tokens}) >= 3, cases
    return cases


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_onnxruntime_genai_generates_our_greedy_tokens(bundles, family):
    bundle = bundles(family, "rpi")
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert config["search"]["past_present_share_buffer"] is False
    manifest = json.loads((bundle / "manifest.json").read_text())
    for prompt, ours in varied_cases(bundle):
        assert onnxruntime_genai._generate(bundle, manifest, prompt, len(ours)).tokens == ours, prompt
    rows = {r["runtime"]: r for r in manifest["runtimes"]}  # what the export itself recorded
    assert rows["onnxruntime-genai"]["status"] == "ok" and rows["onnxruntime-genai"]["same_as_ours"]


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_executorch_runner_generates_our_greedy_tokens(bundles, family):
    bundle = bundles(family, "android")
    manifest = json.loads((bundle / "manifest.json").read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    for prompt, ours in varied_cases(bundle):
        run = executorch_runner._generate(bundle, manifest, prompt, len(ours))
        assert run.pieces == [tokenizer.decode([t], skip_special_tokens=False) for t in ours], prompt
    rows = {r["runtime"]: r for r in manifest["runtimes"]}
    assert rows["executorch TextLLMRunner"]["status"] == "ok" and rows["executorch TextLLMRunner"]["same_as_ours"]


def test_verify_command_prints_the_table_and_json(bundles, tmp_path):
    bundle = bundles("llama", "rpi")
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    assert "onnxruntime-genai" in result.output and "greedy" in result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["runtime"] for r in rows] == ["slm-export", "onnxruntime-genai", "transformers.js"]
    assert all(r["status"] == "ok" and r["loads"] for r in rows)
    assert "## Runtimes the bundle drops into" in (bundle / "report.md").read_text()


def test_a_runtime_that_rejects_the_bundle_is_a_failed_row(bundles, tmp_path):
    """A genai_config.json naming a graph that is not there: onnxruntime-genai fails, with its message."""
    bundle = shutil.copytree(bundles("llama", "rpi"), tmp_path / "broken")
    config = json.loads((bundle / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "missing.onnx"
    (bundle / "genai_config.json").write_text(json.dumps(config))
    rows = {r.runtime: r for r in verify.verify(bundle)}
    assert rows["slm-export"].status == verify.OK
    assert rows["onnxruntime-genai"].status == verify.FAILED and rows["onnxruntime-genai"].loads is False
    assert "missing.onnx" in rows["onnxruntime-genai"].message
    # The CLI refuses the edited bundle before any runtime runs: its hashes no longer match.
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code != 0 and "genai_config.json" in result.output


def test_export_fails_and_writes_nothing_when_an_installed_runtime_rejects_the_bundle(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    from exporter.formats import onnx_genai

    real = onnx_genai.genai_config
    monkeypatch.setattr(onnx_genai, "genai_config", lambda *a: {**real(*a), "model": {"type": "no-such-type"}})
    out = tmp_path / "bundle"
    args = ["--target", "rpi", "--model", str(tiny_model_dir("llama")), "--out", str(out), "--no-latency",
            "--no-reference-check"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 6, result.output
    assert "does not run in onnxruntime-genai" in result.output and not out.exists()
    result = CliRunner().invoke(cli, [*args, "--no-verify"])  # the escape hatch keeps it, unverified
    assert result.exit_code == 0, result.output
    assert "runtimes" not in json.loads((out / "manifest.json").read_text())


def test_a_runtime_that_is_not_installed_is_a_row_not_a_failure(tiny_model_dir, tmp_path, monkeypatch):
    real = verify.installed_version
    monkeypatch.setattr(verify, "installed_version", lambda d: None if d == "onnxruntime-genai" else real(d))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["--target", "rpi", "--model", str(tiny_model_dir("llama")), "--out", str(out),
                                      "--no-latency", "--no-reference-check"])
    assert result.exit_code == 0, result.output
    rows = {r["runtime"]: r for r in json.loads((out / "manifest.json").read_text())["runtimes"]}
    assert rows["onnxruntime-genai"]["status"] == "not installed"
    assert rows["onnxruntime-genai"]["message"] == "not installed: pip install onnxruntime-genai"


def test_differing_tokens_are_reported_where_they_part():
    assert verify.first_difference([5, 6, 7], [5, 6, 9]) == "token 2: 9 here, 7 in slm-export"
