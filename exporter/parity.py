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
from .runtime.metrics import logit_metrics  # noqa: F401  (shared with the device-side runner)
from .texts import eval_text, special_tokens_around, token_windows

GREEDY_QUESTION = "What is the capital of France?"


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """Full-sequence PyTorch logits (n, vocab) for one sequence, no cache."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def artifact_logits(runner, ids: list[int]) -> np.ndarray:
    """Runner logits: prefill the first half, decode the rest one token at a time."""
    split = max(1, len(ids) // 2)
    runner.reset()
    parts = [runner.forward(ids[:split])]
    parts += [runner.forward([t]) for t in ids[split:]]
    return np.concatenate(parts, axis=0)


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


def reference_greedy(model, prompt: list[int], n: int, eos_ids) -> list[int]:
    """Greedy tokens from transformers' own generate (with its KV cache)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(eos_ids) or None,
                             pad_token_id=(list(eos_ids) or [0])[0])
    return out[0, len(prompt):].tolist()




def write_reference(loaded, path, eos_ids=(), window: int = 64, greedy_tokens: int = 16) -> None:
    """Ship expected outputs with the bundle (like ExecuTorch's BundledProgram) for on-device checks.

    Holds one eval window's token ids and PyTorch logits (float16 to keep it small), and a greedy
    prompt with the reference's greedy tokens. ``exporter.runtime.main --parity`` compares against it.
    """
    if loaded.kind != "causal-lm":  # an encoder's hidden states, or a classifier's label logits
        ids = token_windows(loaded.tokenizer, eval_text(), window, 1)[0]
        np.savez_compressed(path, ids=np.asarray(ids, np.int64), hidden=encoder_reference(loaded, ids).astype(np.float16))
        return
    ids = token_windows(loaded.tokenizer, eval_text(), window, 1)[0]
    prompt = greedy_prompt(loaded.tokenizer)
    np.savez_compressed(
        path, ids=np.asarray(ids, np.int64), logits=reference_logits(loaded.model, ids).astype(np.float16),
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


def evaluate(loaded, runner, recipe: str, window: int = 128, max_windows: int = 3, greedy_tokens: int = 32,
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
    if runner.max_context is not None:
        window = min(window, runner.max_context)
    windows = token_windows(loaded.tokenizer, eval_text(), window, max_windows)
    refs, arts, nexts = [], [], []
    with task(progress, f"validate: parity windows of {window} tokens (PyTorch and the artifact)",
              total=len(windows)) as counted:
        for ids in windows:
            refs.append(reference_logits(loaded.model, ids))
            arts.append(artifact_logits(runner, ids))
            nexts.append(np.asarray(ids[1:] + [-1]))
            counted.advance()
    ref, art, nxt = np.concatenate(refs), np.concatenate(arts), np.concatenate(nexts)
    keep = nxt >= 0  # the last position of each window has no known next token
    metrics = logit_metrics(ref, art)
    metrics.update({k: v for k, v in logit_metrics(ref[keep], art[keep], nxt[keep]).items() if k.startswith("ppl")})
    metrics["windows"] = len(windows)
    metrics["per_position"] = per_position(refs, arts)
    prompt = greedy_prompt(loaded.tokenizer)
    eos = runner.spec.get("eos_token_ids", [])
    if runner.spec.get("max_context"):  # a short exported context holds the prompt and fewer new tokens
        greedy_tokens = max(1, min(greedy_tokens, int(runner.spec["max_context"]) - len(prompt)))
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


POSITION_BUCKETS = 16


def per_position(refs: list[np.ndarray], arts: list[np.ndarray], buckets: int = POSITION_BUCKETS) -> dict:
    """Mean |logit error| and top-1 agreement by position along the windows, in ``buckets`` buckets.

    Position i of every window falls in the same bucket, so the figures show where along a sequence
    the artifact drifts (the KV-cache decode half versus the prefill half, long-context error growth);
    a few dozen floats, small enough for the manifest. ``prefill`` is where the decode half starts.
    """
    longest = max(len(r) for r in refs)
    size = -(-longest // buckets)  # ceil: at most ``buckets`` buckets
    err_sum, agree_sum, count = (np.zeros(buckets) for _ in range(3))
    for ref, art in zip(refs, arts):
        bucket = np.arange(len(ref)) // size
        err = np.abs(ref.astype(np.float32) - art.astype(np.float32)).mean(-1)
        np.add.at(err_sum, bucket, err)
        np.add.at(agree_sum, bucket, ref.argmax(-1) == art.argmax(-1))
        np.add.at(count, bucket, 1)
    used = count > 0
    return {"bucket_tokens": int(size), "start": [int(i * size) for i in np.flatnonzero(used)],
            "mean_abs_err": [round(float(x), 5) for x in err_sum[used] / count[used]],
            "top1_agreement": [round(float(x), 4) for x in agree_sum[used] / count[used]],
            "prefill": max(1, len(refs[0]) // 2)}  # artifact_logits' split of the first window


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
