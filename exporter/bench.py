"""``slm-export bench``: exported bundles against PyTorch eager, a peer's export and the bandwidth roofline.

Every contender runs in its own worker process (``exporter.runtime.bench_worker``) and answers the
same commands, so the figures come from one measurement loop. Rounds are interleaved (A B C, B C A,
...) after a warm-up so machine noise hits every contender alike; medians and min..max spreads are
reported, with each contender's ratio to eager in the same run. The roofline: decoding a token
reads every weight once, so decode tok/s cannot exceed memory bandwidth / weight bytes; the
bandwidth is measured here (a large numpy copy) in the same run.

Outputs (``--out DIR``): bench.json, bench.csv and bench.md (llama-bench's column conventions:
model, size, backend, test ``pp<N>`` / ``tg<N>``, t/s) and bench.html with plots.
"""

from __future__ import annotations

import collections
import csv
import gc
import io
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SlmExportError
from .formats.onnx_genai import GENAI_CONFIG
from .htmlpage import esc, figure_png, img, page_head, pyplot

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Contender:
    """One thing to measure: ``kind`` bundle|eager|optimum, the path it loads, the Python that runs it."""

    name: str
    kind: str
    path: str
    python: str = sys.executable
    weight_bytes: int = 0
    format: str = ""
    recipe: str = ""
    proc: subprocess.Popen | None = None
    lines: queue.Queue | None = None  # the worker's stdout lines (None: it closed stdout)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    stderr_reader: threading.Thread | None = None
    info: dict = field(default_factory=dict)
    rounds: list = field(default_factory=list)


# ------------------------------------------------------------------ workers


def _start(c: Contender, threads: int | None, timeout_s: float) -> None:
    cmd = [c.python, "-m", "exporter.runtime.bench_worker", "--kind", c.kind, c.path]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    c.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    # Reader threads: a worker that hangs without a word still meets the timeout below (a blocking
    # readline would wait forever), and a chatty stderr cannot fill its pipe and stall the worker.
    c.lines = queue.Queue()
    threading.Thread(target=_pump, args=(c.proc.stdout, c.lines.put), daemon=True).start()
    c.stderr_reader = threading.Thread(target=_pump, args=(c.proc.stderr, c.stderr_tail.append), daemon=True)
    c.stderr_reader.start()
    c.info = _reply(c, timeout_s)


def _pump(stream, sink) -> None:
    for line in stream:
        sink(line)
    sink(None)


def _reply(c: Contender, timeout_s: float) -> dict:
    # Workers print exactly one JSON line per command; anything else on stdout is a library's chatter.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = c.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            c.proc.wait(timeout=60)
            c.stderr_reader.join(timeout=10)  # the last lines may still be in the pipe
            err = [ln.strip() for ln in c.stderr_tail if ln and ln.strip()]
            raise SlmExportError(f"benchmark contender {c.name} stopped: {err[-1] if err else 'no output'}")
        if line.startswith("{"):
            reply = json.loads(line)
            if "error" in reply:
                raise SlmExportError(f"benchmark contender {c.name} failed: {reply['error']}")
            return reply
    raise SlmExportError(f"benchmark contender {c.name} did not answer within {timeout_s:.0f} s")


def _ask(c: Contender, request: dict, timeout_s: float = 1800) -> dict:
    c.proc.stdin.write(json.dumps(request) + "\n")
    c.proc.stdin.flush()
    return _reply(c, timeout_s)


def _stop(c: Contender) -> None:
    if c.proc and c.proc.poll() is None:
        try:
            c.info.update(_ask(c, {"cmd": "stop"}, timeout_s=60))
        finally:
            c.proc.wait(timeout=60)


# ------------------------------------------------------------------ inputs


def memory_bandwidth_gb_s(mbytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth of this machine: (bytes read + written) / time of a large numpy copy, best of N."""
    src = np.ones(mbytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def bundle_contender(bundle: Path) -> Contender:
    """A contender for a bundle folder; its weight bytes are the artifact files' sizes."""
    from .runtime import read_spec

    spec = read_spec(bundle)
    # ONNX graphs over 2 GB keep their weights beside the graph (model.onnx.data).
    files = [bundle / spec["artifact"], bundle / (spec["artifact"] + ".data")]
    return Contender(name=f"{spec['format']} {spec['recipe']}", kind="bundle", path=str(bundle),
                     weight_bytes=sum(p.stat().st_size for p in files if p.exists()),
                     format=spec["format"], recipe=spec["recipe"])


def genai_contender(bundle: Path) -> Contender:
    """onnxruntime-genai on an ONNX bundle (the same graph as the bundle's row, another generation loop)."""
    ours = bundle_contender(bundle)
    return Contender(name=f"{ours.name} (onnxruntime-genai)", kind="genai", path=str(bundle),
                     weight_bytes=ours.weight_bytes, format="onnx (onnxruntime-genai)", recipe=ours.recipe)


def gguf_file_type(path: Path) -> str:
    """A GGUF's file type as llama.cpp names it (Q4_1, Q4_K_M, ...), from its metadata."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "gguf"
    return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")


def llama_cpp_contenders(loaded, types: tuple[str, ...], progress=lambda msg: None) -> list[Contender]:
    """llama.cpp on the model's own GGUF ("source") and on llama.cpp's requantizations of it (Q8_0,
    Q4_K_M, ...), in llama.cpp's environment (built once, exporter/llama_cpp_peer.py)."""
    from . import llama_cpp_peer

    if loaded.identity.get("source_format") != "gguf":
        raise SlmExportError("--llama-cpp needs a model that came from a GGUF file (the embedded models do)",
                             hint="give --model FILE.gguf or an embedded name, or leave out --llama-cpp")
    gguf = Path(loaded.identity["source"])
    python = llama_cpp_peer.ensure_environment(progress=progress)
    contenders = []
    for type_name in types:
        if type_name.lower() == "source":
            path, label = gguf, f"{gguf_file_type(gguf)} (source)"
        else:
            progress(f"llama.cpp: quantizing {gguf.name} to {type_name.upper()} (cached)")
            path, label = llama_cpp_peer.quantized(python, gguf, type_name), type_name.upper()
        contenders.append(Contender(name=f"llama.cpp {label}", kind="llama_cpp", path=str(path), python=str(python),
                                    weight_bytes=path.stat().st_size, format="gguf", recipe=label))
    return contenders


def eager_contender(model_spec: str | None, loaded) -> Contender:
    """PyTorch eager fp32; weight bytes are the model's unique parameter storage."""
    seen, total = set(), 0
    for p in loaded.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return Contender(name="pytorch eager fp32", kind="eager", path=model_spec or "default",
                     weight_bytes=total, format="pytorch", recipe="fp32")


def optimum_contender(folder: Path, python: str) -> Contender:
    """optimum-onnx's export (its own venv's Python); weight bytes are its .onnx files and data."""
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".onnx.data"))
    return Contender(name="optimum-onnx fp32", kind="optimum", path=str(folder), python=python,
                     weight_bytes=size, format="onnx (optimum)", recipe="fp32")


def write_parity_reference(loaded, path: Path, window: int = 128, windows: int = 2) -> None:
    """Reference logits of the PyTorch model on held-out text windows, for every contender to match."""
    from .parity import reference_logits
    from .texts import eval_text, token_windows

    arrays = {}
    chosen = token_windows(loaded.tokenizer, eval_text(), window, windows)
    for i, ids in enumerate(chosen):
        arrays[f"ids_{i}"] = np.asarray(ids, dtype=np.int64)
        arrays[f"logits_{i}"] = reference_logits(loaded.model, ids).astype(np.float32)
    np.savez(path, windows=len(chosen), **arrays)


# ------------------------------------------------------------------ the run


def run_bench(contenders: list[Contender], prompt: list[int], out_dir: Path, reference: Path,
              rounds: int = 5, decode_tokens: int = 128, threads: int | None = None,
              progress=lambda msg: None) -> dict:
    """Measure every contender in interleaved rounds; write bench.{json,csv,md,html} into ``out_dir``."""
    bandwidth = []
    try:
        for c in contenders:
            progress(f"loading {c.name}")
            _start(c, threads, timeout_s=1800)
        for c in contenders:  # warm-up: caches, allocators, thread pools
            _ask(c, {"cmd": "latency", "prompt": prompt, "decode_tokens": 8})
        for r in range(rounds):
            bandwidth.append(memory_bandwidth_gb_s())
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
            for c in order:
                c.rounds.append(_ask(c, {"cmd": "latency", "prompt": prompt, "decode_tokens": decode_tokens}))
            progress(f"round {r + 1}/{rounds} done")
        for c in contenders:
            progress(f"parity of {c.name}")
            c.info["parity"] = _ask(c, {"cmd": "parity", "reference": str(reference)})
    finally:
        for c in contenders:
            try:
                _stop(c)
            except Exception:
                if c.proc:
                    c.proc.kill()
    result = summarize(contenders, statistics.median(bandwidth), len(prompt), decode_tokens, rounds, threads)
    write_outputs(result, out_dir)
    return result


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(contenders, bandwidth_gb_s: float, prompt_tokens: int, decode_tokens: int, rounds: int,
              threads) -> dict:
    """Rows of figures per contender, with ratios to eager and the roofline fraction."""
    rows = []
    for c in contenders:
        decode = _median_spread([x["decode_tok_s"] for x in c.rounds])
        ceiling = bandwidth_gb_s * 1e9 / c.weight_bytes if c.weight_bytes else float("nan")
        rows.append({
            "name": c.name, "format": c.format, "recipe": c.recipe, "kind": c.kind, "path": c.path,
            "runtime": f"{c.info.get('runtime', '')} {c.info.get('runtime_version', '')}".strip(),
            "size_mb": c.weight_bytes / 1e6,
            "load_s": c.info.get("load_s"),
            "ttft_ms": _median_spread([x["ttft_ms"] for x in c.rounds]),
            "prefill_tok_s": _median_spread([x["prefill_tok_s"] for x in c.rounds]),
            "decode_tok_s": decode,
            "per_token_ms_p50": statistics.median(x["per_token_ms"]["p50"] for x in c.rounds),
            "per_token_ms_p90": statistics.median(x["per_token_ms"]["p90"] for x in c.rounds),
            "decode_samples": [x["decode_tok_s"] for x in c.rounds],
            "peak_rss_mb": c.info.get("peak_rss_mb"),
            "parity": c.info.get("parity", {}),
            "roofline_tok_s": ceiling,
            "roofline_fraction": decode["median"] / ceiling if ceiling == ceiling else None,
        })
    eager = next((r for r in rows if r["kind"] == "eager"), None)
    for r in rows:
        r["x_eager"] = r["decode_tok_s"]["median"] / eager["decode_tok_s"]["median"] if eager else None
    return {"machine": {"cpus": os.cpu_count(), "bandwidth_gb_s": bandwidth_gb_s, "threads": threads},
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "rounds": rounds, "rows": rows}


# ------------------------------------------------------------------ outputs


def markdown(result: dict) -> str:
    pp, tg = result["prompt_tokens"], result["decode_tokens"]
    lines = [
        f"Memory bandwidth (numpy copy, median of rounds): {result['machine']['bandwidth_gb_s']:.1f} GB/s; "
        f"{result['rounds']} interleaved rounds; median (min..max).",
        "",
        f"| model | size MB | load s | TTFT ms | pp{pp} t/s | tg{tg} t/s | x eager | roofline t/s | % roofline "
        "| peak RSS MB | top-1 | ppl change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d, par = r["decode_tok_s"], r["parity"]
        lines.append(
            f"| {r['name']} | {r['size_mb']:.0f} | {r['load_s']:.2f} | {r['ttft_ms']['median']:.0f} "
            f"| {r['prefill_tok_s']['median']:.0f} | {d['median']:.1f} ({d['min']:.1f}..{d['max']:.1f}) "
            f"| {_fmt(r['x_eager'], '.2f')} | {r['roofline_tok_s']:.0f} | {_fmt(r['roofline_fraction'], '.0%')} "
            f"| {_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(par.get('top1_agreement'), '.3f')} "
            f"| {_fmt(par.get('ppl_rel_change'), '+.1%')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


CSV_FIELDS = ("name", "format", "recipe", "size_mb", "load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s",
              "decode_min", "decode_max", "x_eager", "roofline_tok_s", "roofline_fraction", "peak_rss_mb",
              "top1_agreement", "ppl_rel_change")


def write_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in result["rows"]:
        w.writerow({
            "name": r["name"], "format": r["format"], "recipe": r["recipe"], "size_mb": round(r["size_mb"], 1),
            "load_s": r["load_s"], "ttft_ms": r["ttft_ms"]["median"], "prefill_tok_s": r["prefill_tok_s"]["median"],
            "decode_tok_s": r["decode_tok_s"]["median"], "decode_min": r["decode_tok_s"]["min"],
            "decode_max": r["decode_tok_s"]["max"], "x_eager": r["x_eager"], "roofline_tok_s": r["roofline_tok_s"],
            "roofline_fraction": r["roofline_fraction"], "peak_rss_mb": r["peak_rss_mb"],
            "top1_agreement": r["parity"].get("top1_agreement"), "ppl_rel_change": r["parity"].get("ppl_rel_change"),
        })
    return buf.getvalue()


def plot_png(result: dict) -> str:
    """Decode tok/s per contender (bars: median, whiskers: min..max, ticks: roofline) as base64 PNG."""
    rows = result["rows"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.2))
    names = [r["name"] for r in rows]
    med = [r["decode_tok_s"]["median"] for r in rows]
    err = [[m - r["decode_tok_s"]["min"] for m, r in zip(med, rows)], [r["decode_tok_s"]["max"] - m for m, r in zip(med, rows)]]
    ax1.barh(names, med, xerr=err, color="#4a7fb5", capsize=3, label="decode tok/s")
    ax1.scatter([r["roofline_tok_s"] for r in rows], names, marker="|", s=300, color="#c0392b", label="roofline")
    ax1.set_xlabel(f"tokens/s, tg{result['decode_tokens']}")
    ax1.set_xscale("log")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("decode speed vs bandwidth roofline")
    for r in rows:
        top1 = r["parity"].get("top1_agreement")
        if top1 is not None:
            ax2.scatter(r["size_mb"], top1, s=40)
            ax2.annotate(r["name"], (r["size_mb"], top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("size (MB)")
    ax2.set_ylabel("top-1 agreement with PyTorch fp32")
    ax2.set_title("size vs error")
    fig.tight_layout()
    return figure_png(fig)


def write_outputs(result: dict, out_dir: Path) -> None:
    """bench.json, bench.csv, bench.md and bench.html (markdown table + plots) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "bench.csv").write_text(write_csv(result))
    (out_dir / "bench.md").write_text(md)
    (out_dir / "bench.html").write_text(html_page(result, md))


def html_page(result: dict, md: str) -> str:
    """bench.html: the markdown table as text, and the plots."""
    return "\n".join([page_head("slm-export bench", width="1200px"), "<h1>slm-export bench</h1>",
                      f"<pre>{esc(md)}</pre>", img(plot_png(result), "decode speed and size vs error")])


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the held-out English text: the fixed prompt of every contender."""
    from .texts import eval_text

    return tokenizer(" ".join(eval_text().split()), add_special_tokens=False)["input_ids"][:n]


def bench(bundles: list[Path], out_dir: Path, model: str | None = None, eager: bool = True,
          optimum: tuple[Path, str] | None = None, rounds: int = 5, decode_tokens: int = 128,
          prompt_tokens: int = 64, threads: int | None = None, progress=lambda msg: None, genai: bool = False,
          llama_cpp: tuple[str, ...] = ()) -> dict:
    """The ``slm-export bench`` command: build the contender list and reference, then ``run_bench``.

    ``genai``: also run each ONNX bundle that has a genai_config.json through onnxruntime-genai.
    ``llama_cpp``: GGUF types for llama.cpp contenders ("source" = the model's own file, e.g. Q8_0).
    """
    from .loading import load_model

    loaded = load_model(model)
    contenders = [eager_contender(model, loaded)] if eager else []
    contenders += [bundle_contender(b) for b in bundles]
    if genai:
        contenders += [genai_contender(b) for b in bundles if (Path(b) / GENAI_CONFIG).exists()]
    if optimum:
        contenders.append(optimum_contender(*optimum))
    if llama_cpp:
        contenders += llama_cpp_contenders(loaded, llama_cpp, progress)
    if not contenders:
        raise SlmExportError("nothing to benchmark", hint="give bundle folders, or leave the eager baseline on")
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = out_dir / "reference.npz"
    progress("reference logits")
    write_parity_reference(loaded, reference)
    prompt = prompt_ids(loaded.tokenizer, prompt_tokens)
    del loaded  # the workers hold their own copies; this process should not compete for memory
    gc.collect()
    return run_bench(contenders, prompt, out_dir, reference, rounds, decode_tokens, threads, progress)
