"""One benchmark contender in its own process, driven over stdin/stdout by ``exporter.bench``.

    python -m exporter.runtime.bench_worker --kind bundle|eager|optimum|genai|llama_cpp PATH [--threads N]

Every contender (an exported bundle, PyTorch eager, a peer's export) is a ``CausalLMRunner``, so one
measurement loop serves all of them. Each lives in its own process so that its load time and peak
RSS are its own, and the orchestrator can interleave rounds (A B A B ...) while the idle workers
wait on stdin. Protocol: one JSON object per line.

    <- {"ready": true, "load_s": ..., "name": ..., "runtime": ..., "runtime_version": ...}
    -> {"cmd": "latency", "prompt": [ids], "decode_tokens": N}   <- measure_latency(...) figures
    -> {"cmd": "parity", "reference": "ref.npz"}                 <- logit metrics vs the reference
    -> {"cmd": "stop"}                                           <- {"peak_rss_mb": ...}

Bundles need only numpy and their runtime (device-side rule of this package); the eager and peer
contenders are host-only and live in ``exporter.contenders`` (imported by name, only for them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .base import measure_latency, open_runner, peak_rss_mb
from .metrics import logit_metrics

HOST_CONTENDERS = "exporter.contenders"


def open_contender(kind: str, path: Path, threads: int | None):
    """The runner for ``kind``: a bundle folder, or a host-only contender built from ``path``."""
    if kind == "bundle":
        return open_runner(path, threads=threads)
    contenders = importlib.import_module(HOST_CONTENDERS)
    return contenders.open_contender(kind, path, threads)


def parity(runner, reference: Path) -> dict:
    """Feed each reference window from position 0; compare logits (same windows for every contender)."""
    data = np.load(reference)
    refs, arts, nexts = [], [], []
    for i in range(int(data["windows"])):
        ids = [int(t) for t in data[f"ids_{i}"]]
        runner.reset()
        arts.append(runner.forward(ids))
        refs.append(data[f"logits_{i}"])
        nexts.append(np.asarray(ids[1:]))
    # Perplexity pools the windows: each window's last position has no next token.
    ref = np.concatenate([r[:-1] for r in refs])
    art = np.concatenate([a[:-1] for a in arts])
    return logit_metrics(ref, art, np.concatenate(nexts))


def serve(runner, stream_in=sys.stdin, stream_out=sys.stdout) -> None:
    """Answer commands until ``stop`` or end of input."""
    for line in stream_in:
        request = json.loads(line)
        cmd = request.get("cmd")
        if cmd == "latency":
            result = measure_latency(runner, request["prompt"], decode_tokens=int(request["decode_tokens"]),
                                     warmup=0, repeats=1)
            result.pop("per_token_ms_samples", None)
        elif cmd == "parity":
            result = parity(runner, Path(request["reference"]))
        elif cmd == "stop":
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), file=stream_out, flush=True)
            return
        else:
            result = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(result), file=stream_out, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("bundle", "eager", "optimum", "genai", "llama_cpp"), required=True)
    ap.add_argument("path", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        runner = open_contender(args.kind, args.path, args.threads)
    except Exception as e:  # reported to the orchestrator as one line, not a traceback
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({
        "ready": True,
        "load_s": time.perf_counter() - t0,
        "runtime": runner.runtime_name,
        "runtime_version": runner.runtime_version,
    }), flush=True)
    serve(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
