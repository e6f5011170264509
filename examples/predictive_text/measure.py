"""Measure predictive text on held-out real text: keystroke-to-suggestion latency and top-3 accuracy.

    python -m examples.predictive_text.measure [--bundle DIR] [--words 200] [--keystrokes 200] [--json OUT]

Text: the project's held-out English sample (exporter/data/eval_english.txt, the start of *Pride and
Prejudice*, never used for calibration), hard line wraps joined into paragraphs, starting after the
title and the novel's famous first sentence.

* latency: the text is typed one character at a time and every keystroke asks for suggestions, as the
  app does (the context stays in the KV cache between keystrokes); p50/p90 over the keystrokes.
* accuracy: at each of ``--words`` consecutive word starts (typed text ends with the space before
  the word), a hit if the actual next word is among the 3 suggestions (exact, and ignoring case);
  also after its first letter is typed.
* junk: the share of suggestions no one would accept, over the suggestions shown at each word start,
  after its first letter and after the whole word is typed. A suggestion is junk if it starts with
  punctuation ("'s"), is not a word (glued pieces such as "liketo": not a whole-word token of the
  vocabulary, nor a word of the shipped calibration text or of the held-out text itself, contractions
  of those allowed), repeats an earlier suggestion up to case and curly/straight apostrophes
  ("isn't" / "isn’t"), or is the word already typed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from examples.common import AppError, open_bundle, resolve_bundle
from examples.predictive_text.suggest import Lexicon, Predictor, normalise, shipped_texts

WORD = re.compile(r"[A-Za-z][A-Za-z']*")
SKIP_CHARS = 600  # title page and the first sentence, which every LM has seen quoted


def held_out_text() -> str:
    """The eval text as typed prose: paragraphs (blank-line separated) with their line wraps joined."""
    from exporter.texts import builtin_text

    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", builtin_text("eval_english.txt"))]
    return "\n".join(p for p in paras if len(p.split()) >= 8)


def word_positions(text: str, start: int, n: int) -> list[tuple[int, str]]:
    """(offset, word) of the first ``n`` words after ``start`` that follow a space."""
    out = []
    for m in WORD.finditer(text, start):
        if m.start() > 0 and text[m.start() - 1] == " ":
            out.append((m.start(), m.group()))
            if len(out) == n:
                break
    return out


def junk(words: list[str], typed: str, judge: Lexicon) -> list[str]:
    """The junk among one suggestion list (see the module docstring), as "word (why)"."""
    out, seen = [], set()
    for w in words:
        why = ("starts with punctuation" if not w[:1].isalnum() else "not a word" if w not in judge
               else "repeated" if normalise(w) in seen else "the typed word" if normalise(w) == normalise(typed) else None)
        seen.add(normalise(w))
        if why:
            out.append(f"{w} ({why})")
    return out


def measure_accuracy(predictor: Predictor, text: str, n_words: int) -> dict:
    """Top-3 next-word hit rates at word starts and after the first letter; the share of junk."""
    hits = {"exact": 0, "nocase": 0, "first_letter": 0}
    positions = word_positions(text, SKIP_CHARS, n_words)
    judge = Lexicon(predictor.bundle.token_bytes, shipped_texts() + [text])
    examples, junk_found, shown = [], [], 0
    for offset, word in positions:
        words = [s.word for s in predictor.suggest(text[:offset])]
        first = [s.word for s in predictor.suggest(text[:offset + 1])]
        full = [s.word for s in predictor.suggest(text[:offset + len(word)])]
        hits["exact"] += word in words
        hits["nocase"] += word.lower() in [w.lower() for w in words]
        hits["first_letter"] += word in first
        for typed, sugs in (("", words), (word[0], first), (word, full)):
            shown += len(sugs)
            junk_found += junk(sugs, typed, judge)
        if len(examples) < 8:
            examples.append({"context": text[max(0, offset - 40):offset], "next": word, "suggested": words})
    n = len(positions)
    return {"words": n, "top3": hits["exact"] / n, "top3_ignore_case": hits["nocase"] / n,
            "top3_after_first_letter": hits["first_letter"] / n, "examples": examples,
            "suggestions_shown": shown, "junk_share": len(junk_found) / shown if shown else 0.0,
            "junk_examples": junk_found[:20]}


def measure_keystrokes(predictor: Predictor, text: str, n_keys: int, start: int) -> dict:
    """Latency of each keystroke's suggestions while typing ``n_keys`` characters from ``start``."""
    times = []
    for i in range(start, start + n_keys):
        t0 = time.perf_counter()
        predictor.suggest(text[:i + 1])
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return {"keystrokes": len(times), "p50_ms": float(np.percentile(arr, 50)),
            "p90_ms": float(np.percentile(arr, 90)), "max_ms": float(arr.max()), "mean_ms": float(arr.mean())}


def run(bundle_dir: Path, n_words: int, n_keys: int, threads: int | None, max_calls: int) -> dict:
    bundle = open_bundle(bundle_dir, threads=threads)
    text = held_out_text()
    predictor = Predictor(bundle, max_calls=max_calls)
    predictor.suggest(text[:SKIP_CHARS])  # warm-up: first session run and context prefill
    latency = measure_keystrokes(predictor, text, n_keys, SKIP_CHARS)
    accuracy = measure_accuracy(Predictor(bundle, max_calls=max_calls), text, n_words)
    return {"bundle": str(bundle_dir), "format": bundle.spec["format"], "recipe": bundle.spec.get("recipe"),
            "threads": threads, "max_calls": max_calls, "latency": latency, "accuracy": accuracy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.predictive_text.measure", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--keystrokes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-calls", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    try:
        result = run(resolve_bundle(args.bundle), args.words, args.keystrokes, args.threads, args.max_calls)
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    lat, acc = result["latency"], result["accuracy"]
    print(f"{result['format']} {result['recipe']}: keystroke->suggestions p50 {lat['p50_ms']:.0f} ms, "
          f"p90 {lat['p90_ms']:.0f} ms over {lat['keystrokes']} keystrokes; top-3 next word "
          f"{acc['top3']:.1%} ({acc['top3_ignore_case']:.1%} ignoring case), after 1st letter "
          f"{acc['top3_after_first_letter']:.1%}, on {acc['words']} held-out words; junk "
          f"{acc['junk_share']:.1%} of {acc['suggestions_shown']} suggestions shown")
    if acc["junk_examples"]:
        print("  junk: " + ", ".join(acc["junk_examples"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
