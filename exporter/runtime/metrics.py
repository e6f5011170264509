"""Logit comparison metrics, shared by the host parity gate and the device-side runner (numpy only).

Both sides score one evaluation set (``parity.eval_windows``) and compare it window by window, so at most
one window's logits are in memory (a 262k vocabulary makes one 128-token window 134 MB of float32) and
the device's top-1 and perplexity are the gate's, on the same tokens. The reference side can be a
``Summary`` read from the bundle: top-1, top-5 and the next token's log-loss are all a comparison needs,
without shipping full-vocabulary logits for every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K = 5
POSITION_BUCKETS = 16


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_tokens(ids) -> np.ndarray:
    """The known next token after each position of one window (-1 at its end, where none is known)."""
    return np.asarray(list(ids[1:]) + [-1], np.int64)


@dataclass
class Summary:
    """What a comparison needs of one side's (n, vocab) logits: argmax, top-5 set, next-token log-loss."""

    top1: np.ndarray  # (n,) int
    top5: np.ndarray  # (n, TOP_K) int, as a set (unordered)
    nll: np.ndarray  # (n,) float; NaN where the next token is not known


def summarize(logits: np.ndarray, next_ids: np.ndarray) -> Summary:
    """``Summary`` of (n, vocab) ``logits``; ``next_ids[i]`` is the true token after position i (-1: unknown)."""
    x = np.asarray(logits, np.float32)
    next_ids = np.asarray(next_ids)
    # argpartition, not argsort: the top-5 set without sorting a 262k vocabulary at every position
    top5 = np.argpartition(-x, TOP_K - 1, axis=-1)[:, :TOP_K] if x.shape[-1] > TOP_K else np.argsort(-x, -1)
    nll = np.full(len(x), np.nan)
    known = np.flatnonzero(next_ids >= 0)
    if len(known):
        nll[known] = -log_softmax(x[known])[np.arange(len(known)), next_ids[known]]
    return Summary(x.argmax(-1), top5.astype(np.int64), nll)


def abs_errors(ref: np.ndarray, art: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the max and the mean |ref - art| over the vocabulary."""
    diff = np.abs(np.asarray(ref, np.float32) - np.asarray(art, np.float32))
    return diff.max(-1), diff.mean(-1)


class LogitStats:
    """Reference against artifact, accumulated window by window; ``result`` gives the gate's metrics.

    ``bucket_tokens`` (the positions per bucket of ``per_position``) turns on the by-position figures.
    """

    def __init__(self, bucket_tokens: int | None = None, prefill: int | None = None):
        self.bucket_tokens, self.prefill = bucket_tokens, prefill
        self.positions = self.agree1 = 0
        self.overlap5 = 0.0
        self.nll_ref = self.nll_art = 0.0  # summed over the positions whose next token is known
        self.scored = 0
        self.err_max, self.err_sum, self.err_count = 0.0, 0.0, 0
        self.buckets: dict[int, list[float]] = {}  # bucket -> [err sum, err count, agree sum, count]

    def add(self, ref: Summary, art: Summary, errors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """One window: both sides' summaries and, when the reference logits are at hand, ``abs_errors``."""
        agree = ref.top1 == art.top1
        self.positions += len(agree)
        self.agree1 += int(agree.sum())
        self.overlap5 += sum(len(set(a) & set(b)) for a, b in zip(ref.top5.tolist(), art.top5.tolist())) / TOP_K
        known = ~np.isnan(ref.nll)
        self.nll_ref += float(ref.nll[known].sum())
        self.nll_art += float(art.nll[known].sum())
        self.scored += int(known.sum())
        if errors is not None:
            self.err_max = max(self.err_max, float(errors[0].max()))
            self.err_sum += float(errors[1].sum())
            self.err_count += len(errors[1])
        if self.bucket_tokens:
            for pos in range(len(agree)):
                b = self.buckets.setdefault(pos // self.bucket_tokens, [0.0, 0, 0, 0])
                if errors is not None:
                    b[0] += float(errors[1][pos])
                    b[1] += 1
                b[2] += bool(agree[pos])
                b[3] += 1

    def result(self) -> dict:
        """The metrics over every window added (the keys of the parity gate's thresholds)."""
        n = max(self.positions, 1)
        metrics = {"positions": self.positions, "top1_agreement": self.agree1 / n, "top5_agreement": self.overlap5 / n}
        if self.err_count:
            metrics.update(max_abs_err=self.err_max, mean_abs_err=self.err_sum / self.err_count)
            if self.err_count != self.positions:
                metrics["abs_err_positions"] = self.err_count
        if self.scored:
            ref, art = self.nll_ref / self.scored, self.nll_art / self.scored
            metrics.update(ppl_ref=float(np.exp(ref)), ppl_art=float(np.exp(art)), ppl_rel_change=float(np.exp(art - ref) - 1))
        if self.buckets:
            used = sorted(self.buckets)
            metrics["per_position"] = {
                "bucket_tokens": self.bucket_tokens, "start": [b * self.bucket_tokens for b in used],
                "mean_abs_err": [round(self.buckets[b][0] / max(self.buckets[b][1], 1), 5) for b in used],
                "top1_agreement": [round(self.buckets[b][2] / self.buckets[b][3], 4) for b in used],
                "prefill": self.prefill}
        return metrics


def logit_metrics(ref: np.ndarray, art: np.ndarray, next_ids: np.ndarray | None = None) -> dict:
    """Compare (n, vocab) logits; ``next_ids[i]`` is the true token after position i (for perplexity)."""
    n = len(ref)
    nxt = np.full(n, -1, np.int64)
    if next_ids is not None:
        nxt[: len(next_ids)] = np.asarray(next_ids)[:n]
    stats = LogitStats()
    stats.add(summarize(ref, nxt), summarize(art, nxt), abs_errors(ref, art))
    return stats.result()
