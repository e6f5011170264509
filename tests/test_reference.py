"""The PyTorch reference is checked before any export: plausibility of its perplexity, and llama.cpp's
logits on the same GGUF (exporter/reference.py, exporter/llama_cpp_peer.py)."""

from __future__ import annotations

import contextlib

import pytest

from exporter import reference
from exporter.reference import ImplausibleReference


def test_bounds_depend_on_size():
    assert reference.perplexity_bound(1_000_000) is None  # random test models are not checked
    assert reference.perplexity_bound(50_000_000) == 400.0
    assert reference.perplexity_bound(135_000_000) == 120.0


def test_tiny_random_model_is_measured_but_not_judged(tiny_loaded):
    result = reference.check(tiny_loaded("llama"), cross_check="never")
    assert result["checked"] is False and "random test models" in result["why"]
    assert result["ppl"] > 100  # a random model of a 1000-token vocabulary is near-uniform


def test_encoder_is_not_checked(tiny_loaded):
    assert reference.check(tiny_loaded("bert"))["checked"] is False


def test_a_model_of_trained_size_with_random_weights_is_refused(tiny_loaded, monkeypatch):
    """The bound applies by parameter count: the same random model, claimed to be 135M, is refused."""
    loaded = tiny_loaded("llama")
    monkeypatch.setitem(loaded.identity, "num_parameters", 135_000_000)
    with pytest.raises(ImplausibleReference, match=r"perplexity \d+\.\d on English text.*below 120"):
        reference.check(loaded, cross_check="never")


@pytest.fixture(scope="module")
def smollm2():
    from exporter.loading import load_model

    return load_model(None)


@contextlib.contextmanager
def altered(weight, change):
    """``weight`` replaced by ``change(weight)`` for the block (the shared model is put back after)."""
    import torch

    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.copy_(change(saved))
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def scrambled_rows(weight):
    import torch

    return weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))]


@pytest.mark.slow
def test_real_smollm2_reference_is_plausible(smollm2):
    result = reference.check(smollm2, cross_check="never")
    assert result["checked"] and result["ppl"] < 60, result


@pytest.mark.slow
def test_real_smollm2_with_scrambled_embeddings_is_refused(smollm2):
    """A conversion that scrambles the embedding rows (a tokenizer/vocab mismatch looks the same)."""
    with altered(smollm2.model.get_input_embeddings().weight, scrambled_rows):
        with pytest.raises(ImplausibleReference, match="implausible"):
            reference.check(smollm2, cross_check="never")


# llama.cpp is built once from the llama-cpp-python sdist (minutes of CPU, cached under the model
# cache): the full suite builds it, the fast tier (-m "not slow") skips these.
@pytest.mark.slow
def test_real_smollm2_agrees_with_llama_cpp(smollm2):
    result = reference.check(smollm2, cross_check="always")["llama_cpp"]
    assert result["checked"] and result["tokens_identical"], result
    assert result["top1_agreement"] >= 0.92 and abs(result["ppl_rel_change"]) < 0.03, result


@pytest.mark.slow
def test_real_smollm2_whose_weights_drifted_from_the_gguf_is_refused(smollm2):
    """Perplexity alone would pass this model (it still knows English); llama.cpp on the GGUF does not
    agree with it, so the export is refused."""
    with altered(smollm2.model.model.layers[3].mlp.down_proj.weight, lambda w: -w):
        result = reference.check(smollm2, cross_check="never")
        assert result["checked"], result  # plausible on its own
        with pytest.raises(ImplausibleReference, match="disagrees with llama.cpp"):
            reference.check(smollm2, cross_check="always")


@pytest.mark.slow
def test_cli_refuses_a_broken_reference_before_any_export(smollm2, tmp_path):
    """Through the real CLI: a SmolLM2 folder whose embedding rows are scrambled exits 2 with the
    reason, before the export, and writes nothing."""
    import shutil

    from test_cli import run_cli

    folder = tmp_path / "scrambled"
    with altered(smollm2.model.get_input_embeddings().weight, scrambled_rows):
        smollm2.model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2.folder / name).exists():
            shutil.copy(smollm2.folder / name, folder / name)
    out = tmp_path / "bundle"
    proc = run_cli("--target", "host", "--format", "onnx", "--model", folder, "--out", out, "--no-latency")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reference is implausible" in proc.stderr and "exporting" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").environ.get("SLM_EXPORT_REAL_GEMMA") != "1",
                    reason="Gemma-3-270M packages are large: set SLM_EXPORT_REAL_GEMMA=1 (see test_real_models.py)")
def test_real_gemma3_agrees_with_llama_cpp_and_is_refused_without_bos(monkeypatch):
    from exporter import texts
    from exporter.loading import load_model

    gemma = load_model("gemma3-270m")
    result = reference.check(gemma, cross_check="always")
    assert result["ppl"] < 40 and result["llama_cpp"]["tokens_identical"], result
    assert result["llama_cpp"]["top1_agreement"] >= 0.92, result
    monkeypatch.setattr(texts, "special_tokens_around", lambda tokenizer: ([], []))  # the old, BOS-less windows
    with pytest.raises(ImplausibleReference, match="implausible"):
        reference.check(gemma, cross_check="never")
