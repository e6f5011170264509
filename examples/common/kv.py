"""A KV-cache session over a runner: feed a token sequence, reusing the longest cached prefix.

Going back to a shorter prefix (chat turns that differ at the end, the branches of the word search)
uses the runner's ``rewind`` (exporter.runtime.base.CausalLMRunner): onnx slices its cache, pte and
tflite move their static cache's position back. A runner that cannot rewind falls back to reset +
prefill.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class KVSession:
    """Tracks which tokens are in the runner's cache; ``feed`` returns the logits after a sequence."""

    def __init__(self, runner):
        self.runner = runner
        self.tokens: list[int] = []
        self._last_logits: np.ndarray | None = None
        self.forward_calls = 0
        self.fed_tokens = 0

    def reset(self) -> None:
        self.runner.reset()
        self.tokens = []
        self._last_logits = None

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) of the next token after ``tokens``, feeding only what the cache lacks."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed needs at least one token")
        if tokens == self.tokens and self._last_logits is not None:
            return self._last_logits
        keep = _common_prefix(self.tokens, tokens)
        keep = min(keep, len(tokens) - 1)  # at least one token must be run to get its logits
        if not self.runner.rewind(keep):
            self.runner.reset()
            keep = 0
        self.tokens = self.tokens[:keep]
        logits = self.runner.forward(tokens[keep:])
        self.forward_calls += 1
        self.fed_tokens += len(tokens) - keep
        self.tokens = tokens
        self._last_logits = np.asarray(logits[-1], dtype=np.float32)
        return self._last_logits

    def append(self, token: int) -> np.ndarray:
        """Logits after appending one token (the decode step)."""
        return self.feed(self.tokens + [int(token)])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
