"""Gemma-3 (``gemma3_text``) in every format, decoded well past its sliding window.

The tiny config (tests/tiny_models.py "gemma3") has Gemma-3-270M's shape of trouble: one kv head,
head_dim 256, sliding and full-attention layers, and a window of 8 tokens, so a 48-token sequence
crosses the window many times. Every format is compared with transformers' full-sequence logits
(its own sliding-window masks) and with greedy generation on transformers' own cache.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from exporter.formats import ExportOptions, get_format
from exporter.runtime.base import RUNTIME_SPEC, greedy_generate, open_runner

ARCH = "gemma3"
LENGTH = 48  # six windows of 8
MAX_ERR = 1e-3  # fp32: measured ~1e-5 (onnx, tflite), ~1e-4 (pte, XNNPACK)


def token_ids(n: int = LENGTH, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(3, 1000, n)]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, prompt, n: int) -> list[int]:
    """Greedy tokens from transformers' generate (its own cache, cropped to the window on sliding layers)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def bundle(fmt: str, loaded, folder, **options):
    art = get_format(fmt).build(loaded, "fp32", ExportOptions(**options), folder)
    (folder / RUNTIME_SPEC).write_text(json.dumps(art.spec))
    return open_runner(folder, art.spec, verify_files=False)


def prefill_then_decode(runner, ids, split: int) -> np.ndarray:
    runner.reset()
    return np.concatenate([runner.forward(ids[:split])] + [runner.forward([t]) for t in ids[split:]])


def check_past_the_window(runner, loaded, split: int = 5) -> None:
    """Logits of a prefill + token-by-token decode, and greedy tokens, both well past the window."""
    ids = token_ids()
    ref = hf_logits(loaded.model, ids)
    err = np.abs(prefill_then_decode(runner, ids, split) - ref).max(-1)
    assert err.max() < MAX_ERR, f"max error {err.max():.3g}, first bad position {int(np.argmax(err > MAX_ERR))}"
    prompt = ids[:4]
    assert greedy_generate(runner, prompt, 28) == hf_greedy(loaded.model, prompt, 28)


def test_the_tiny_config_exercises_the_window(tiny_loaded):
    """Sanity: the reference depends on the window (a format ignoring it would fail the tests)."""
    loaded = tiny_loaded(ARCH)
    cfg = loaded.model.config
    assert cfg.num_key_value_heads == 1 and cfg.head_dim == 256 and cfg.sliding_window == 8
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    unwindowed = copy.deepcopy(loaded.model)
    unwindowed.config.sliding_window = 10_000
    ids = token_ids()
    assert np.abs(hf_logits(unwindowed, ids) - hf_logits(loaded.model, ids))[8:].max() > 0.1


@pytest.mark.slow
def test_onnx_past_the_sliding_window(tiny_loaded, tmp_path):
    loaded = tiny_loaded(ARCH)
    runner = bundle("onnx", loaded, tmp_path)
    check_past_the_window(runner, loaded)
    # Every layer's cache keeps the whole context: one shared past axis, never cropped.
    assert {p.shape[2] for p in runner.past} == {runner.position}


@pytest.mark.slow
def test_tflite_past_the_sliding_window(tiny_loaded, tmp_path):
    loaded = tiny_loaded(ARCH)
    runner = bundle("tflite", loaded, tmp_path, max_context=64, prefill_lengths=(8, 16))
    check_past_the_window(runner, loaded)  # prefill_8 with 3 padding slots, then decode
    # Chunked prefill 16 + 16 + 8: the window is crossed inside and across the prefill signatures.
    ids = token_ids(40, seed=1)
    runner.reset()
    assert np.abs(runner.forward(ids) - hf_logits(loaded.model, ids)).max() < MAX_ERR


@pytest.mark.slow
def test_pte_past_the_sliding_window(tiny_loaded, tmp_path):
    loaded = tiny_loaded(ARCH)
    runner = bundle("pte", loaded, tmp_path, max_context=64)
    check_past_the_window(runner, loaded)
    # A prompt longer than the window in one call, then decode steps.
    ids = token_ids(seed=2)
    assert np.abs(prefill_then_decode(runner, ids, 20) - hf_logits(loaded.model, ids)).max() < MAX_ERR
