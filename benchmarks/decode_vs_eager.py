"""Decode speed of exported bundles against PyTorch eager fp32 (HF generate with its KV cache), same run.

    python benchmarks/decode_vs_eager.py BUNDLE [BUNDLE ...] [--model PATH] [--rounds 3] [--tokens 64]

Rounds are interleaved (eager, bundle 1, bundle 2, ..., eager, ...) after one warm-up each, so machine
noise hits every contender alike; the table reports medians and each bundle's ratio to eager.
Prints markdown; --json FILE also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.loading import load_model  # noqa: E402
from exporter.runtime import open_runner, read_spec  # noqa: E402
from exporter.runtime.base import measure_latency  # noqa: E402
from exporter.texts import eval_text  # noqa: E402


def eager_decode_tok_s(model, prompt_ids: list[int], tokens: int) -> float:
    """Decode tok/s of HF generate (greedy, KV cache): (time(prompt + N) - time(prompt + 1)) / (N - 1)."""
    import torch

    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)

    def timed(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - t0

    one = timed(1)
    full = timed(tokens)
    return (tokens - 1) / (full - one)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="reference model (default: the embedded SmolLM2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    prompt = loaded.tokenizer(" ".join(eval_text().split()), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    runners = {}
    for b in args.bundles:
        spec = read_spec(b)
        runners[f"{spec['format']} {spec['recipe']} ({b.name})"] = open_runner(b, spec)
    results = {"pytorch eager fp32": []} | {name: [] for name in runners}
    eager_decode_tok_s(loaded.model, prompt, 4)  # warm-up
    for r in runners.values():
        measure_latency(r, prompt, decode_tokens=4, warmup=0, repeats=1)
    for rnd in range(args.rounds):
        results["pytorch eager fp32"].append(eager_decode_tok_s(loaded.model, prompt, args.tokens))
        for name, r in runners.items():
            results[name].append(measure_latency(r, prompt, decode_tokens=args.tokens, warmup=0, repeats=1)["decode_tok_s"])
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(results["pytorch eager fp32"])
    print(f"| contender | decode tok/s (median of {args.rounds}) | min..max | x eager |")
    print("|---|---|---|---|")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.1f} | {min(vals):.1f}..{max(vals):.1f} | {med / base:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "tokens": args.tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
