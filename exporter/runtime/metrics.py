"""Logit comparison metrics, shared by the host parity gate and the device-side runner (numpy only)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logit_metrics(ref: np.ndarray, art: np.ndarray, next_ids: np.ndarray | None = None) -> dict:
    """Compare (n, vocab) logits; ``next_ids[i]`` is the true token after position i (for perplexity)."""
    ref = np.asarray(ref, np.float32)
    art = np.asarray(art, np.float32)
    diff = np.abs(ref - art)
    top5_ref = np.argsort(-ref, axis=-1)[:, :5]
    top5_art = np.argsort(-art, axis=-1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_art)]
    metrics = {
        "positions": int(ref.shape[0]),
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "top1_agreement": float((ref.argmax(-1) == art.argmax(-1)).mean()),
        "top5_agreement": float(np.mean(overlap)),
    }
    if next_ids is not None and len(next_ids):
        idx = np.arange(len(next_ids))
        nll_ref = -log_softmax(ref[: len(next_ids)])[idx, next_ids].mean()
        nll_art = -log_softmax(art[: len(next_ids)])[idx, next_ids].mean()
        metrics["ppl_ref"] = float(np.exp(nll_ref))
        metrics["ppl_art"] = float(np.exp(nll_art))
        metrics["ppl_rel_change"] = float(np.exp(nll_art - nll_ref) - 1.0)
    return metrics
