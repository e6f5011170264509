"""The parity gate: the exported artifact, run in its runtime, against the PyTorch reference.

On windows of a real English text (``exporter/data/eval_english.txt``) it compares logits (max / mean
absolute error, top-1 and top-5 agreement, perplexity of both), and it checks that greedy generation
of N tokens is identical. Each window is half prefilled, half decoded token by token, so both the
prefill path and the KV-cache decode path of the artifact are measured.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .progress import task
from .recipes import get_recipe
from .runtime import EncoderRunner, greedy_generate
from .runtime.base import REFERENCE_FILE  # noqa: F401  (the pipeline writes it; runtime.main reads it)
from .runtime.base import artifact_logits  # noqa: F401  (shared with the device-side runner)
from .runtime.metrics import POSITION_BUCKETS, LogitStats, abs_errors, logit_metrics, next_tokens, summarize  # noqa: F401
from .texts import eval_text, special_tokens_around, token_windows

GREEDY_QUESTION = "What is the capital of France?"


# The one evaluation set: the gate scores it, the bundle ships the reference's summary of it, and the
# device-side check scores the same windows against that summary. 8 x 128 tokens: top-1 near 0.9 is then
# known to about +-0.01 (one standard error, sqrt(0.9 * 0.1 / 1016)); 3 windows gave +-0.016, and the
# 64-token window the device used to score gave 0.781 where the gate said 0.833 for one bundle.
EVAL_WINDOW = 128
EVAL_WINDOWS = 8


def eval_windows(tokenizer, max_context: int | None = None, window: int = EVAL_WINDOW,
                 count: int = EVAL_WINDOWS) -> list[list[int]]:
    """The evaluation set's token windows (shorter when the artifact's context is shorter)."""
    return token_windows(tokenizer, eval_text(), min(window, max_context or window), count)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """Full-sequence PyTorch logits (n, vocab) for one sequence, no cache."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def greedy_prompt(tokenizer) -> list[int]:
    """A fixed chat prompt (when the tokenizer has a chat template) or the eval text's first words."""
    if getattr(tokenizer, "chat_template", None):
        from .limits import render_chat_template

        ids = render_chat_template(lambda: tokenizer.apply_chat_template(
            [{"role": "user", "content": GREEDY_QUESTION}], add_generation_prompt=True, tokenize=True),
            "the model's chat template")
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prefix, _ = special_tokens_around(tokenizer)  # a prompt to continue: no end-of-sequence suffix
    return prefix + tokenizer(" ".join(eval_text().split()[:24]), add_special_tokens=False)["input_ids"]


def greedy_budget(requested: int, prompt: list[int], max_context: int | None) -> int:
    """How many greedy tokens fit: a short exported context holds the prompt and fewer new tokens."""
    return max(1, min(requested, int(max_context) - len(prompt))) if max_context else requested


def reference_greedy(model, prompt: list[int], n: int, eos_ids) -> list[int]:
    """Greedy tokens from transformers' own generate (with its KV cache)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(eos_ids) or None,
                             pad_token_id=(list(eos_ids) or [0])[0])
    return out[0, len(prompt):].tolist()




def write_reference(loaded, path, eos_ids=(), max_context: int | None = None, greedy_tokens: int = 32) -> None:
    """Ship expected outputs with the bundle (like ExecuTorch's BundledProgram) for on-device checks.

    A causal LM's file holds the evaluation set (``eval_ids``, one row per window) with the reference's
    ``Summary`` of every position (``ref_top1``, ``ref_top5``, ``ref_nll``), the first window's full
    logits (float16, for the max / mean error), and the gate's greedy prompt with the reference's greedy
    tokens (as many as the gate generates).
    ``exporter.runtime.main --parity`` scores the same windows against it, so its top-1 and perplexity
    are the gate's figures on the same tokens.
    """
    if loaded.kind != "causal-lm":  # an encoder's hidden states, or a classifier's label logits
        ids = token_windows(loaded.tokenizer, eval_text(), 64, 1)[0]
        np.savez_compressed(path, ids=np.asarray(ids, np.int64), hidden=encoder_reference(loaded, ids).astype(np.float16))
        return
    windows = eval_windows(loaded.tokenizer, max_context)
    first = reference_logits(loaded.model, windows[0])
    summaries = [summarize(first, next_tokens(windows[0]))]
    summaries += [summarize(reference_logits(loaded.model, ids), next_tokens(ids)) for ids in windows[1:]]
    prompt = greedy_prompt(loaded.tokenizer)
    greedy_tokens = greedy_budget(greedy_tokens, prompt, max_context)
    np.savez_compressed(
        path, eval_ids=np.asarray(windows, np.int64),
        ref_top1=np.stack([s.top1 for s in summaries]), ref_top5=np.stack([s.top5 for s in summaries]),
        ref_nll=np.stack([s.nll for s in summaries]).astype(np.float32),
        ids=np.asarray(windows[0], np.int64), logits=first.astype(np.float16),
        greedy_prompt=np.asarray(prompt, np.int64),
        greedy_expected=np.asarray(reference_greedy(loaded.model, prompt, greedy_tokens, eos_ids), np.int64),
    )


def encoder_reference(loaded, ids: list[int]) -> np.ndarray:
    """PyTorch output of an encoder for one sequence: hidden states (len, hidden), or label logits."""
    import torch

    from .formats import encoder_output

    with torch.no_grad():
        t = torch.tensor([ids])
        return encoder_output(loaded.model(input_ids=t, attention_mask=torch.ones_like(t)), loaded.kind)[0].numpy()


def evaluate(loaded, runner, recipe: str, window: int = EVAL_WINDOW, max_windows: int = EVAL_WINDOWS, greedy_tokens: int = 32,
             progress: Callable[[str], None] = lambda m: None) -> dict:
    """Parity metrics of ``runner`` against ``loaded.model`` and whether ``recipe``'s thresholds hold."""
    thresholds = get_recipe(recipe).thresholds_for(getattr(runner, "spec", None))
    if loaded.kind == "sequence-classifier":
        metrics = _classifier_metrics(loaded, runner)
    elif isinstance(runner, EncoderRunner):
        metrics = _encoder_metrics(loaded, runner, window, max_windows)
    else:
        metrics = _causal_metrics(loaded, runner, window, max_windows, greedy_tokens, progress)
    failures = thresholds.failures(metrics)
    return {"metrics": metrics, "thresholds": {k: v for k, v in vars(thresholds).items() if v not in (None, False)},
            "failures": failures, "passed": not failures}


def _causal_metrics(loaded, runner, window, max_windows, greedy_tokens, progress) -> dict:
    windows = eval_windows(loaded.tokenizer, runner.max_context, window, max_windows)
    longest = max(len(ids) for ids in windows)
    stats = LogitStats(bucket_tokens=-(-longest // POSITION_BUCKETS), prefill=max(1, len(windows[0]) // 2))
    with task(progress, f"validate: parity windows, {len(windows)} of {len(windows[0])} tokens (PyTorch and "
                        "the artifact)", total=len(windows)) as counted:
        for ids in windows:  # one window's logits at a time: a 262k vocabulary is 134 MB per window and side
            ref, art, nxt = reference_logits(loaded.model, ids), artifact_logits(runner, ids), next_tokens(ids)
            stats.add(summarize(ref, nxt), summarize(art, nxt), abs_errors(ref, art))
            counted.advance()
    metrics = stats.result()
    metrics["windows"] = len(windows)
    prompt = greedy_prompt(loaded.tokenizer)
    eos = runner.spec.get("eos_token_ids", [])
    greedy_tokens = greedy_budget(greedy_tokens, prompt, runner.spec.get("max_context"))
    with task(progress, f"validate: greedy generation of {greedy_tokens} tokens on both sides"):
        expected = reference_greedy(loaded.model, prompt, greedy_tokens, eos)
        got = greedy_generate(runner, prompt, greedy_tokens, eos)
    first_diff = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                      None if len(expected) == len(got) else min(len(expected), len(got)))
    metrics.update({
        "greedy_tokens": len(expected),
        "greedy_requested": greedy_tokens,  # greedy_tokens is fewer when PyTorch stopped at an end-of-sequence token
        "greedy_identical": first_diff is None,
        "greedy_first_diff": first_diff,
        "greedy_reference_text": loaded.tokenizer.decode(expected, skip_special_tokens=True),
        "greedy_artifact_text": loaded.tokenizer.decode(got, skip_special_tokens=True),
    })
    return metrics


# A classifier is judged on its decisions over many short texts (sentence-sized windows of the eval
# text): one long window would give a single label.
CLASSIFIER_TEXTS = 48
CLASSIFIER_TOKENS = 24


def _classifier_metrics(loaded, runner) -> dict:
    windows = token_windows(loaded.tokenizer, eval_text(), CLASSIFIER_TOKENS, CLASSIFIER_TEXTS)
    ref = np.stack([encoder_reference(loaded, ids) for ids in windows])
    art = np.stack([runner.encode(ids) for ids in windows]).astype(np.float32)
    diff = np.abs(ref - art)
    return {"texts": len(windows), "label_agreement": float((ref.argmax(-1) == art.argmax(-1)).mean()),
            "max_abs_err": float(diff.max()), "mean_abs_err": float(diff.mean()),
            "labels": len(runner.spec.get("labels") or []) or int(ref.shape[-1])}


def _encoder_metrics(loaded, runner, window, max_windows) -> dict:
    windows = token_windows(loaded.tokenizer, eval_text(), min(window, runner.spec.get("max_context") or window),
                            max_windows)
    refs, arts = [], []
    for ids in windows:
        refs.append(encoder_reference(loaded, ids))
        arts.append(runner.encode(ids))
    ref, art = np.concatenate(refs), np.concatenate(arts).astype(np.float32)
    cos = (ref * art).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(art, axis=-1) + 1e-12)
    diff = np.abs(ref - art)
    return {"positions": int(ref.shape[0]), "max_abs_err": float(diff.max()), "mean_abs_err": float(diff.mean()),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "windows": len(windows)}
