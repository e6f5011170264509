"""Choosing the next token from logits: greedy, temperature, top-k, top-p (seeded), repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class SamplingConfig:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")


class Sampler:
    """Picks tokens by a SamplingConfig; one seeded generator, so a seed makes runs repeatable."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config or SamplingConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        cfg = self.config
        logits = np.asarray(logits, dtype=np.float64).copy()
        if cfg.repetition_penalty != 1.0 and len(previous):
            seen = np.unique(np.asarray(previous, dtype=np.int64))
            seen = seen[seen < len(logits)]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.temperature == 0:
            return int(np.argmax(logits))
        return int(self.rng.choice(len(logits), p=probabilities(logits, cfg)))


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution sampled from: softmax(logits / T) restricted to top-k, then to the top-p nucleus."""
    scaled = logits / cfg.temperature
    keep = np.ones(len(scaled), dtype=bool)
    if cfg.top_k and cfg.top_k < len(scaled):
        kth = np.partition(scaled, -cfg.top_k)[-cfg.top_k]
        keep &= scaled >= kth
    scaled = np.where(keep, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        # the smallest set whose mass reaches top_p (always at least the most likely token)
        cut = int(np.searchsorted(cum, cfg.top_p)) + 1
        mask = np.zeros(len(probs), dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs
