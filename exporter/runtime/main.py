"""Run a bundle here and report load time, latency figures, peak RSS, runtime and device.

    python -m exporter.runtime.main BUNDLE_DIR [--decode-tokens N] [--repeats R] [--threads T] [--parity] [--json]

A table for people; with ``--json`` one JSON line (what the host latency check and the device
adapters read). The host latency check runs this in a fresh process (so peak RSS is the runtime's
alone), and the device adapters run the same file on the device. The bundle is checked against its
manifest before anything is loaded (``--no-verify`` is for the exporter's own staging folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from .base import (
    REFERENCE_FILE,
    EncoderRunner,
    RunnerError,
    measure_encoder_latency,
    measure_latency,
    open_runner,
    peak_rss_mb,
)
from .messages import condense


def device_identity() -> dict:
    """What this machine is: board model, CPU, cores, memory, OS, Python."""
    ident = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            ident["board"] = Path(path).read_text().strip("\x00\n ")
            break
        except OSError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":")[0].strip().lower()
            if key in ("model name", "hardware", "cpu part") and "cpu" not in ident:
                ident["cpu"] = line.split(":", 1)[1].strip()
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
        ident["mem_total_mb"] = int(mem.split()[1]) // 1024
    except (OSError, IndexError, ValueError):
        pass
    try:
        ident["os_release"] = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
        ).get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    return ident


def check_parity(runner, bundle_dir: Path) -> dict | None:
    """Compare this runtime's outputs with the reference outputs shipped in the bundle.

    A causal LM is scored on the bundle's evaluation set (every window, as the export's gate scored it),
    against the reference's summary of it; max / mean error on the first window, whose full reference
    logits the bundle carries. Bundles from before the evaluation set carry one window of full logits.
    """
    import numpy as np

    from .base import artifact_logits, greedy_generate
    from .metrics import LogitStats, Summary, abs_errors, logit_metrics, next_tokens, summarize

    path = Path(bundle_dir) / REFERENCE_FILE
    if not path.exists():
        return None
    with np.load(path) as stored:
        ref = dict(stored)
    ids = ref["ids"].tolist()
    if isinstance(runner, EncoderRunner):
        art = runner.encode(ids).astype(np.float32)
        exp = ref["hidden"].astype(np.float32)
        cos = (art * exp).sum(-1) / (np.linalg.norm(art, axis=-1) * np.linalg.norm(exp, axis=-1) + 1e-12)
        return {"positions": len(ids), "max_abs_err": float(np.abs(art - exp).max()), "cosine_min": float(cos.min())}
    if "eval_ids" in ref:
        stats = LogitStats()
        for k, window in enumerate(ref["eval_ids"].tolist()):
            art = artifact_logits(runner, window)
            expected = Summary(ref["ref_top1"][k], ref["ref_top5"][k], ref["ref_nll"][k].astype(np.float64))
            stats.add(expected, summarize(art, next_tokens(window)),
                      abs_errors(ref["logits"], art) if k == 0 else None)
        metrics = stats.result()
        metrics["windows"] = len(ref["eval_ids"])
    else:
        metrics = logit_metrics(ref["logits"].astype(np.float32), artifact_logits(runner, ids), np.asarray(ids[1:]))
    expected = ref["greedy_expected"].tolist()
    got = greedy_generate(runner, ref["greedy_prompt"].tolist(), len(expected), runner.spec.get("eos_token_ids", []))
    metrics["greedy_identical"] = got == expected
    metrics["greedy_first_diff"] = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    # The reference logits are stored as float16: errors below ~1e-2 are at that storage precision.
    metrics["reference_precision"] = "float16"
    return metrics


def run(bundle_dir: Path, decode_tokens: int, repeats: int, warmup: int, threads: int | None,
        parity: bool = False, verify_files: bool = True) -> dict:
    """Open the bundle (verified against its manifest), measure latency, optionally check parity."""
    t0 = time.perf_counter()
    runner = open_runner(bundle_dir, None, verify_files=verify_files, threads=threads)
    spec = runner.spec
    load_s = time.perf_counter() - t0
    prompt = spec.get("latency_prompt_ids") or [1, 2, 3, 4, 5, 6, 7, 8]
    if isinstance(runner, EncoderRunner):
        latency = measure_encoder_latency(runner, prompt, repeats=max(repeats, 5))
    else:
        latency = measure_latency(runner, prompt, decode_tokens=decode_tokens, warmup=warmup, repeats=repeats)
    latency["load_s"] = load_s
    parity_metrics = check_parity(runner, bundle_dir) if parity else None
    latency["peak_rss_mb"] = peak_rss_mb()
    return {
        "parity": parity_metrics,
        "format": spec["format"],
        "runtime": runner.runtime_name,
        "runtime_version": runner.runtime_version,
        "threads": threads,
        "latency": latency,
        "device": device_identity(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parity", action="store_true", help="also compare with the bundle's reference outputs")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the manifest check (only for a folder the exporter has just written)")
    args = ap.parse_args(argv)
    try:
        result = run(args.bundle, args.decode_tokens, args.repeats, args.warmup, args.threads, args.parity,
                     verify_files=not args.no_verify)
    except RunnerError as e:
        return _fail(str(e), args.json, 2)
    except Exception as e:  # noqa: BLE001 - a runtime's own failure: one line, not a traceback
        return _fail(condense(e), args.json, 3)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _fail(message: str, as_json: bool, code: int) -> int:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


def format_table(result: dict) -> str:
    """The figures of ``run`` as an aligned plain-text table (this package has no rich on devices)."""
    lat = result["latency"]
    rows = [("runtime", f"{result['runtime']} {result['runtime_version']}"),
            ("device", f"{result['device'].get('hostname')} ({result['device'].get('cpu') or result['device'].get('machine')}, "
                       f"{result['device'].get('cpu_count')} CPUs)")]
    figures = (("load_s", "load (s)", "{:.2f}"), ("ttft_ms", "time to first token (ms)", "{:.1f}"),
               ("prefill_tok_s", "prefill (tok/s)", "{:.1f}"), ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
               ("encode_ms", "encode (ms)", "{:.2f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"))
    rows += [(label, fmt.format(lat[key])) for key, label, fmt in figures if isinstance(lat.get(key), (int, float))]
    pct = lat.get("per_token_ms") or lat.get("per_call_ms")
    if pct:
        rows.append(("p50 / p90 / p99 (ms)", " / ".join(f"{pct[q]:.2f}" for q in ("p50", "p90", "p99"))))
    par = result.get("parity") or {}
    for key, label in (("max_abs_err", "max |logit error|"), ("top1_agreement", "top-1 agreement"),
                       ("cosine_min", "min cosine"), ("greedy_identical", "greedy identical")):
        if key in par:
            rows.append((f"parity: {label}", f"{par[key]:.4g}" if isinstance(par[key], float) else str(par[key])))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


if __name__ == "__main__":
    sys.exit(main())
