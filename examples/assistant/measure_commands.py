"""Accuracy of command mode on a labelled set of real-world-style commands (commands_eval.jsonl).

    python -m examples.assistant.measure_commands [--set FILE] [--commands FILE] [--embedder BUNDLE] [--json OUT]

The set's phrasings are not the vocabulary's examples; a third of it must be refused (out of scope,
negated, missing a required value, or saying a value the command has no slot for); items may carry a
"kind" (compound: a sequence of "steps"; compound-refusal, refusal-unused-slot, refusal-missing-slot).
Reported: overall accuracy (right intent, or refused when it
should be), slot accuracy (every labelled slot value right, on correctly mapped commands), refusal
precision/recall, right answers by kind, and the same accuracy at other similarity thresholds to show how sensitive it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from examples.common import AppError
from examples.assistant.commands import CommandMapper, Embedder, Vocabulary

DEFAULT_SET = Path(__file__).with_name("commands_test.jsonl")  # held out: never used to tune
DEV_SET = Path(__file__).with_name("commands_dev.jsonl")  # used while writing the vocabulary


def load_set(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise AppError(f"cannot read the labelled set {path}: {e}") from None


def _slots_ok(got: dict, want: dict) -> bool:
    return all(got.get("slots", {}).get(k) == v for k, v in (want.get("slots") or {}).items())


def _right(got: dict, want: dict) -> bool:
    """The right intent (or refusal); for a compound command the right steps in order."""
    if want.get("intent") != "sequence":
        return got["intent"] == want.get("intent")
    steps = got.get("steps") or []
    return got["intent"] == "sequence" and [st["intent"] for st in steps] == [w["intent"] for w in want["steps"]]


def kind(item: dict) -> str:
    """The item's group in the report: simple, to-refuse, or the set's own "kind" (compound, ...)."""
    return item.get("kind") or ("refusal" if item.get("intent") is None else "simple")


def evaluate(mapper: CommandMapper, items: list[dict], threshold: float | None = None) -> dict:
    """Accuracy figures (overall and by kind) and the mistakes."""
    right = slot_total = slot_right = 0
    refused_ok = refused_all = should_refuse = 0
    errors, by_kind = [], {}
    for item in items:
        got = mapper.map(item["text"], threshold)
        want = item.get("intent")
        ok = _right(got, item)
        right += ok
        tally = by_kind.setdefault(kind(item), [0, 0])
        tally[0] += ok
        tally[1] += 1
        should_refuse += want is None
        refused_all += got["intent"] is None
        refused_ok += got["intent"] is None and want is None
        wants = item["steps"] if want == "sequence" else [item]
        if ok and want is not None and any(w.get("slots") for w in wants):
            gots = got["steps"] if want == "sequence" else [got]
            slot_total += 1
            good = all(_slots_ok(g, w) for g, w in zip(gots, wants))
            slot_right += good
            if not good:
                errors.append({"text": item["text"], "want_slots": [w.get("slots") for w in wants],
                               "got_slots": [g["slots"] for g in gots]})
        if not ok:
            errors.append({"text": item["text"], "want": want, "got": got["intent"], "score": got["score"],
                           "refused": got.get("refused"),
                           "got_steps": [st["intent"] for st in got.get("steps", [])] or None})
    n = len(items)
    return {"commands": n, "accuracy": right / n, "in_scope": n - should_refuse, "to_refuse": should_refuse,
            "slot_accuracy": slot_right / slot_total if slot_total else None, "slot_checked": slot_total,
            "refusal_precision": refused_ok / refused_all if refused_all else None,
            "refusal_recall": refused_ok / should_refuse if should_refuse else None,
            "by_kind": {k: {"right": r, "of": t} for k, (r, t) in sorted(by_kind.items())}, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.assistant.measure_commands", description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=DEFAULT_SET)
    ap.add_argument("--commands", type=Path, default=None, help="extra vocabulary merged over the built-in one")
    ap.add_argument("--embedder", type=Path, default=None, help="encoder bundle of all-MiniLM-L6-v2 (default: the package)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        vocab = Vocabulary.load(args.commands)
        mapper = CommandMapper(vocab, Embedder(args.embedder))
        items = load_set(args.set)
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    result = evaluate(mapper, items)
    result["threshold"] = vocab.threshold
    result["sweep"] = {f"{t:.2f}": evaluate(mapper, items, t)["accuracy"] for t in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)}
    print(f"command accuracy {result['accuracy']:.1%} on {result['commands']} commands "
          f"({result['in_scope']} in scope, {result['to_refuse']} to refuse); slots {result['slot_accuracy']:.1%} "
          f"of {result['slot_checked']}; refusal precision {result['refusal_precision']:.1%}, "
          f"recall {result['refusal_recall']:.1%}; threshold {vocab.threshold}")
    print("by kind: " + ", ".join(f"{k} {v['right']}/{v['of']}" for k, v in result["by_kind"].items()))
    print("accuracy by threshold: " + ", ".join(f"{t}: {a:.1%}" for t, a in result["sweep"].items()))
    for e in result["errors"]:
        print("  miss:", json.dumps(e))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
