"""Is the PyTorch reference a working model? Checked before any export work.

Every parity figure compares the artifact with the PyTorch model, so a broken reference (a tokenizer
that drops BOS, weights that do not belong to the config, a bad GGUF conversion) makes a passing gate
meaningless: Gemma-3-270M scored without its BOS token has perplexity 294 on English text instead of 24,
and an artifact "matching" it is matching garbage. Two checks:

1. Plausibility: a trained causal LM of this size scores the shipped English text (exporter/data,
   Pride and Prejudice, with the tokenizer's own special tokens) below a perplexity bound. The bounds
   are loose on purpose (measured on these windows: SmolLM2-135M 29.1, Gemma-3-270M 23.1, and 357.6
   for Gemma scored without its BOS token); they catch references that are broken, not models that
   are weak. Models too small to be trained LMs (the random tiny
   test models, < ``MIN_CHECKED_PARAMS``) and encoders are not checked, and the result says so.
2. Cross-check (exporter/llama_cpp_peer.py): when the model came from a GGUF and llama.cpp is available,
   llama.cpp's logits on the same file and tokens must agree with PyTorch's.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import SlmExportError
from .texts import eval_text, token_windows

WINDOW = 128
WINDOWS = 2
MIN_CHECKED_PARAMS = 20_000_000
# (at least this many parameters, highest plausible perplexity on the eval text), largest first.
PLAUSIBLE_PPL = ((100_000_000, 120.0), (MIN_CHECKED_PARAMS, 400.0))


class ImplausibleReference(SlmExportError):
    """The loaded PyTorch model does not behave like a trained model: parity against it proves nothing."""

    exit_code = 2


def perplexity_bound(num_parameters: int) -> float | None:
    """The highest plausible perplexity for a trained causal LM of ``num_parameters`` (None: not checked)."""
    return next((bound for size, bound in PLAUSIBLE_PPL if num_parameters >= size), None)


def windows(tokenizer, window: int = WINDOW, count: int = WINDOWS) -> list[list[int]]:
    """The token windows both checks score (the eval text, with the tokenizer's special tokens)."""
    return token_windows(tokenizer, eval_text(), window, count)


def stack(logits: list[np.ndarray], token_windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every window's (n, vocab) logits as one array, and each position's next token (-1 at a window's end)."""
    return np.concatenate(logits), np.concatenate([np.asarray(ids[1:] + [-1]) for ids in token_windows])


def perplexity(logits: np.ndarray, next_ids: np.ndarray) -> float:
    """Perplexity of stacked ``logits`` on the known next tokens (``stack``)."""
    from .runtime.metrics import log_softmax

    keep = next_ids >= 0
    scored = log_softmax(logits[keep])[np.arange(int(keep.sum())), next_ids[keep]]
    return math.exp(-float(scored.mean()))


def check(loaded, progress: Callable[[str], None] = lambda m: None, cross_check: str = "auto") -> dict:
    """Check the reference; raise ImplausibleReference when it is broken; return what was checked.

    ``cross_check``: "auto" runs llama.cpp when its environment is already built, "always" builds it
    if needed, "never" skips it.
    """
    if loaded.kind != "causal-lm":
        return {"checked": False, "why": "an encoder has no perplexity to check"}
    params = int(loaded.identity.get("num_parameters") or sum(p.numel() for p in loaded.model.parameters()))
    bound = perplexity_bound(params)
    from .parity import reference_logits
    from .progress import task

    ids = windows(loaded.tokenizer)
    with task(progress, "reference: perplexity of the PyTorch model on the English eval text",
              total=len(ids)) as counted:
        logits = []  # scored here, compared with llama.cpp below
        for w in ids:
            logits.append(reference_logits(loaded.model, w))
            counted.advance()
    ppl = perplexity(*stack(logits, ids))
    result = {"checked": bound is not None, "ppl": round(ppl, 3), "ppl_bound": bound, "num_parameters": params,
              "tokens": sum(len(w) for w in ids)}
    if bound is None:
        result["why"] = (f"{params / 1e6:.1f}M parameters: below {MIN_CHECKED_PARAMS / 1e6:.0f}M a model is "
                         "not expected to know English (random test models)")
    elif ppl > bound:
        raise ImplausibleReference(
            f"the PyTorch reference is implausible: perplexity {ppl:.1f} on English text, where a trained "
            f"model of {params / 1e6:.0f}M parameters scores below {bound:g}; a parity gate against it "
            "would prove nothing",
            hint="check that the tokenizer adds the model's special tokens (tokenizer_config.json "
                 "add_bos_token), that the weights belong to this config, and that the model is a trained "
                 "language model; --no-reference-check exports anyway")
    if loaded.identity.get("source_format") == "gguf" and cross_check != "never":
        from . import llama_cpp_peer as llama_cpp

        result["llama_cpp"] = llama_cpp.cross_check(loaded, ids, logits, build=(cross_check == "always"), progress=progress)
    return result


def compare_logits(reference: np.ndarray, other: np.ndarray, next_ids: np.ndarray) -> dict:
    """Agreement of two (n, vocab) logit arrays over the same tokens: top-1, max error, both perplexities."""
    from .runtime.metrics import logit_metrics

    m = logit_metrics(reference, other, next_ids)
    return {k: m[k] for k in ("top1_agreement", "max_abs_err", "mean_abs_err", "ppl_ref", "ppl_art") if k in m}
