"""`slm-export bench`: interleaved contenders in worker processes, ratios to eager, roofline, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from exporter import bench
from exporter.runtime import bench_worker, open_runner
from test_cli import run_cli


@pytest.fixture(scope="module")
def onnx_bundles(tiny_model_dir, tmp_path_factory):
    """fp32 and int8-dynamic ONNX bundles of the tiny Llama (latency check skipped: bench measures)."""
    made = {}
    for recipe in ("fp32", "int8-dynamic"):
        out = tmp_path_factory.mktemp("bench") / recipe
        proc = run_cli("--target", "host", "--format", "onnx", "--recipe", recipe, "--model",
                       tiny_model_dir("llama"), "--out", out, "--no-latency", "--no-gate")
        assert proc.returncode == 0, proc.stderr[-3000:]
        made[recipe] = out
    return made


@pytest.mark.slow
def test_bench_against_eager_writes_every_output(onnx_bundles, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", onnx_bundles["fp32"], onnx_bundles["int8-dynamic"], "--model", tiny_model_dir("llama"),
                   "--out", out, "--rounds", "2", "--decode-tokens", "8", "--prompt-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["pytorch eager fp32", "onnx fp32", "onnx int8-dynamic"]
    assert rows["pytorch eager fp32"]["x_eager"] == pytest.approx(1.0)
    for r in rows.values():
        assert len(r["decode_samples"]) == 2 and r["decode_tok_s"]["min"] <= r["decode_tok_s"]["median"] <= r["decode_tok_s"]["max"]
        assert r["decode_tok_s"]["median"] > 0 and r["load_s"] > 0 and r["peak_rss_mb"] > 10
        assert 0 < r["roofline_fraction"] < 1, r  # a ceiling no contender may pass
        assert r["parity"]["positions"] > 100
    # Eager is the reference itself; the fp32 export must match it; int8 must differ but stay close.
    assert rows["pytorch eager fp32"]["parity"]["max_abs_err"] < 1e-4
    assert rows["onnx fp32"]["parity"]["max_abs_err"] < 1e-3 and rows["onnx fp32"]["parity"]["top1_agreement"] == 1.0
    assert 0 < rows["onnx int8-dynamic"]["parity"]["max_abs_err"] < 1.0
    # Smaller weights, higher roofline.
    assert rows["onnx int8-dynamic"]["roofline_tok_s"] > rows["onnx fp32"]["roofline_tok_s"]
    assert "| pytorch eager fp32 |" in (out / "bench.md").read_text() and "tg8 t/s" in proc.stdout
    with open(out / "bench.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == list(rows)
    assert "data:image/png;base64," in (out / "bench.html").read_text()


@pytest.mark.slow
def test_worker_measures_any_runner_with_the_same_protocol(onnx_bundles, tiny_loaded, tmp_path):
    """The worker loop answers latency and parity for a bundle runner; parity of a runner against
    a reference made from another model's logits must show the mismatch (the check can fail)."""
    import io

    loaded = tiny_loaded("llama")
    ref = tmp_path / "ref.npz"
    bench.write_parity_reference(loaded, ref, window=32, windows=2)
    runner = open_runner(onnx_bundles["fp32"])
    good = bench_worker.parity(runner, ref)
    assert good["top1_agreement"] == 1.0 and good["positions"] == 62
    data = dict(np.load(ref))
    data["logits_0"] = data["logits_0"][:, ::-1].copy()  # a different model's opinion
    data["logits_1"] = data["logits_1"][:, ::-1].copy()
    np.savez(tmp_path / "bad.npz", **data)
    assert bench_worker.parity(runner, tmp_path / "bad.npz")["top1_agreement"] < 0.2
    requests = io.StringIO('{"cmd": "latency", "prompt": [5, 6, 7], "decode_tokens": 4}\n{"cmd": "stop"}\n')
    replies = io.StringIO()
    bench_worker.serve(runner, requests, replies)
    latency, stop = [json.loads(x) for x in replies.getvalue().splitlines()]
    assert latency["decode_tokens"] == 4 and latency["decode_tok_s"] > 0 and stop["peak_rss_mb"] > 0


@pytest.mark.slow
def test_broken_contender_is_one_clear_error(onnx_bundles, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in onnx_bundles["fp32"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    proc = run_cli("bench", broken, "--no-eager", "--model", tiny_model_dir("llama"), "--out", tmp_path / "b",
                   "--rounds", "1", "--decode-tokens", "4")
    assert proc.returncode != 0
    assert "benchmark contender onnx fp32 failed" in proc.stderr and "Traceback" not in proc.stderr


def test_memory_bandwidth_is_measured():
    assert 0.1 < bench.memory_bandwidth_gb_s(mbytes=32, repeats=2) < 10_000


@pytest.mark.slow
def test_bench_runs_onnx_bundles_through_onnxruntime_genai_too(onnx_bundles, tiny_model_dir, tmp_path):
    """--genai: each ONNX bundle also runs in onnxruntime-genai's loop; same graph, so the same logits."""
    out = tmp_path / "bench"
    proc = run_cli("bench", onnx_bundles["int8-dynamic"], "--model", tiny_model_dir("llama"), "--no-eager", "--genai",
                   "--out", out, "--rounds", "1", "--decode-tokens", "8", "--prompt-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["onnx int8-dynamic", "onnx int8-dynamic (onnxruntime-genai)"]
    ours, genai = rows.values()
    assert genai["runtime"].startswith("onnxruntime-genai") and genai["decode_tok_s"]["median"] > 0
    assert genai["parity"]["top1_agreement"] == ours["parity"]["top1_agreement"]
    assert genai["parity"]["max_abs_err"] == pytest.approx(ours["parity"]["max_abs_err"], abs=1e-3)


@pytest.mark.slow
def test_bench_runs_llama_cpp_on_the_source_gguf_and_its_requantization(tmp_path):
    """--llama-cpp: llama.cpp (built once, as the reference check does) on the embedded SmolLM2's own
    Q4_1 GGUF and on llama.cpp's Q8_0 requantization of it, measured by the same worker loop."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "--no-eager", "--llama-cpp", "source,Q8_0", "--out", out, "--rounds", "1",
                   "--decode-tokens", "8", "--prompt-tokens", "16", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["llama.cpp Q4_1 (source)", "llama.cpp Q8_0"]
    source, q8 = rows.values()
    assert source["runtime"].startswith("llama.cpp") and source["decode_tok_s"]["median"] > 0
    # Logits against the PyTorch model dequantized from the same GGUF: close (the reference check
    # measured top-1 0.953); Q8_0 of the same weights stays close too, and is the bigger file.
    assert source["parity"]["top1_agreement"] >= 0.9 and q8["parity"]["top1_agreement"] >= 0.85, rows
    assert q8["size_mb"] > source["size_mb"]
