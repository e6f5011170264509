"""Accuracy of command mode on a labelled set of real-world-style commands (commands_eval.jsonl).

    python -m examples.assistant.measure_commands [--set FILE] [--commands FILE] [--embedder BUNDLE] [--json OUT]

The set's phrasings are not the vocabulary's examples; a third of it must be refused (out of scope,
negated, or missing a required value). Reported: overall accuracy (right intent, or refused when it
should be), slot accuracy (every labelled slot value right, on correctly mapped commands), refusal
precision/recall, and the same accuracy at other similarity thresholds to show how sensitive it is.
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


def evaluate(mapper: CommandMapper, items: list[dict], threshold: float | None = None) -> dict:
    """Accuracy figures and the mistakes."""
    right = slot_total = slot_right = 0
    refused_ok = refused_all = should_refuse = 0
    errors = []
    for item in items:
        got = mapper.map(item["text"], threshold)
        want = item.get("intent")
        ok = got["intent"] == want
        right += ok
        should_refuse += want is None
        refused_all += got["intent"] is None
        refused_ok += got["intent"] is None and want is None
        if ok and want is not None and item.get("slots"):
            slot_total += 1
            good = all(got["slots"].get(k) == v for k, v in item["slots"].items())
            slot_right += good
            if not good:
                errors.append({"text": item["text"], "want_slots": item["slots"], "got_slots": got["slots"]})
        if not ok:
            errors.append({"text": item["text"], "want": want, "got": got["intent"], "score": got["score"],
                           "refused": got.get("refused")})
    n = len(items)
    return {"commands": n, "accuracy": right / n, "in_scope": n - should_refuse, "to_refuse": should_refuse,
            "slot_accuracy": slot_right / slot_total if slot_total else None, "slot_checked": slot_total,
            "refusal_precision": refused_ok / refused_all if refused_all else None,
            "refusal_recall": refused_ok / should_refuse if should_refuse else None, "errors": errors}


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
    print("accuracy by threshold: " + ", ".join(f"{t}: {a:.1%}" for t, a in result["sweep"].items()))
    for e in result["errors"]:
        print("  miss:", json.dumps(e))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
