"""Human-readable reports of a bundle: ``report.md`` and ``report.html`` (with plots)."""

from __future__ import annotations

from pathlib import Path

from .htmlpage import esc, figure_png, img, page_head, pyplot

PARITY_ROWS = (
    ("max_abs_err", "max |logit error|", "{:.4g}"),
    ("mean_abs_err", "mean |logit error|", "{:.4g}"),
    ("top1_agreement", "top-1 agreement", "{:.4f}"),
    ("top5_agreement", "top-5 overlap", "{:.4f}"),
    ("ppl_ref", "perplexity (PyTorch)", "{:.3f}"),
    ("ppl_art", "perplexity (artifact)", "{:.3f}"),
    ("ppl_rel_change", "perplexity change", "{:+.4%}"),
    ("greedy_identical", "greedy tokens identical", "{}"),
    ("cosine_min", "min cosine (hidden states)", "{:.6f}"),
)
LATENCY_ROWS = (
    ("load_s", "load time (s)", "{:.3f}"),
    ("ttft_ms", "time to first token (ms)", "{:.1f}"),
    ("prefill_tok_s", "prefill (tok/s)", "{:.1f}"),
    ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
    ("encode_ms", "encode (ms)", "{:.2f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
)


def parity_rows(parity: dict) -> list[tuple[str, str, str]]:
    """(metric, value, threshold) rows for display."""
    metrics, th = parity.get("metrics", {}), parity.get("thresholds", {})
    limits = {"max_abs_err": ("<= ", "max_abs_err"), "top1_agreement": (">= ", "top1_min"),
              "top5_agreement": (">= ", "top5_min"), "ppl_rel_change": ("within ±", "ppl_rel_change_max"),
              "greedy_identical": ("required", "greedy_identical"), "cosine_min": (">= ", "encoder_cosine_min")}
    rows = []
    encoder = "cosine_min" in metrics  # hidden states compared, not logits
    for key, label, fmt in PARITY_ROWS:
        if key not in metrics or metrics[key] is None:
            continue
        if encoder:
            label = label.replace("logit error", "hidden-state error")
        prefix, tkey = limits.get(key, ("", None))
        limit = th.get(tkey) if tkey else None
        limit_text = "" if limit is None else (prefix if limit is True else f"{prefix}{limit:g}")
        rows.append((label, fmt.format(metrics[key]), limit_text))
    return rows


def latency_rows(latency: dict) -> list[tuple[str, str]]:
    rows = [(label, fmt.format(latency[key])) for key, label, fmt in LATENCY_ROWS if latency.get(key) is not None]
    pct = latency.get("per_token_ms") or latency.get("per_call_ms")
    if pct:
        unit = "per token" if latency.get("per_token_ms") else f"per call of {latency.get('tokens', '?')} tokens"
        rows.append((f"{unit} p50 / p90 / p99 (ms)", " / ".join(f"{pct[q]:.2f}" for q in ("p50", "p90", "p99"))))
    return rows


def artifact_size(manifest: dict) -> str:
    """The artifact's size, and its ratio to the model's weights in float32 (what the recipe saved)."""
    size = manifest["artifact"]["bytes"]
    fp32 = 4 * manifest["model"].get("num_parameters", 0)  # the PyTorch reference's weights
    text = f"{size / 1e6:.1f} MB"
    return f"{text}, {size / fp32:.2f}x the {fp32 / 1e6:.1f} MB of fp32 weights" if fp32 else text


def markdown(manifest: dict) -> str:
    """The bundle's report.md."""
    m = manifest
    lines = [f"# {m['model'].get('embedded') or m['model'].get('source')} -> {m['format']} / {m['recipe']} "
             f"for {m['target']}", ""]
    lines += [f"- artifact: `{m['artifact']['files'][0]}` ({artifact_size(m)})",
              f"- model: {m['model'].get('model_type')} with {m['model'].get('num_parameters', 0) / 1e6:.1f} M parameters",
              f"- created {m['created']} by slm-export {m['versions'].get('slm-export', '?')}", ""]
    for note in m["artifact"].get("notes", []):
        lines.append(f"- note: {note}")
    parity = m.get("parity")
    if parity:
        verdict = "PASSED" if parity["passed"] else "FAILED: " + "; ".join(parity["failures"])
        lines += ["", f"## Parity against PyTorch fp32 ({verdict})", "", "| metric | value | threshold |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in parity_rows(parity)]
        met = parity["metrics"]
        if "greedy_reference_text" in met:
            lines += ["", f"Greedy {met['greedy_tokens']} tokens, PyTorch: {met['greedy_reference_text']!r}",
                      f"Greedy, artifact: {met['greedy_artifact_text']!r}"]
    latency = m.get("latency")
    if latency:
        lat = latency["latency"]
        lines += ["", f"## Latency on {latency['device'].get('hostname')} ({latency['runtime']} "
                  f"{latency['runtime_version']}, {latency['device'].get('cpu', latency['device'].get('machine'))})",
                  "", "| figure | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in latency_rows(lat)]
        if "prompt_tokens" in lat:
            lines += ["", f"Prompt of {lat['prompt_tokens']} tokens, {lat['decode_tokens']} decoded tokens, "
                      f"{lat['warmup']} warm-up + {lat['repeats']} measured repeats (medians)."]
    device = m.get("device")
    if device:
        dev = device.get("device", {})
        lines += ["", f"## Latency on the device ({dev.get('model') or dev.get('serial', '?')}, "
                  f"{device.get('runtime', 'on-device runner')})", "", "| figure | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in latency_rows(device["latency"])]
    budgets = m.get("budget_failures")
    if budgets:
        lines += ["", "Target budgets missed on this machine (budgets apply on the device): " + "; ".join(budgets)]
    return "\n".join(lines) + "\n"


def latency_plot(samples_ms: list[float], title: str, per: str = "per-token decode") -> str | None:
    """Histogram of per-token (or per-call) latency as a base64 PNG (None when there is nothing to plot)."""
    if not samples_ms:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3))
    ax.hist(samples_ms, bins=min(40, max(5, len(samples_ms) // 4)), color="#4477aa")
    ax.set_xlabel(f"{per} latency (ms)")
    ax.set_ylabel("tokens" if "token" in per else "calls")
    ax.set_title(title)
    return figure_png(fig)


def html_report(manifest: dict, markdown_text: str) -> str:
    """report.html: the tables of report.md plus the latency distribution plot."""
    parts = [page_head(f"{manifest['format']} / {manifest['recipe']}", width="56em",
                       css=".fail{color:#b00}.pass{color:#070}")]
    parity = manifest.get("parity")
    parts.append(f"<h1>{esc(markdown_text.splitlines()[0].lstrip('# '))}</h1>")
    if parity:
        cls, word = ("pass", "passed") if parity["passed"] else ("fail", "failed")
        parts.append(f"<h2>Parity <span class={cls}>{word}</span></h2><table><tr><th>metric<th>value<th>threshold")
        parts += [f"<tr><td>{esc(a)}<td>{esc(b)}<td>{esc(c)}" for a, b, c in parity_rows(parity)]
        parts.append("</table>")
    latency = manifest.get("latency")
    if latency:
        lat = latency["latency"]
        parts.append("<h2>Latency</h2><table>" + "".join(f"<tr><td>{esc(a)}<td>{esc(b)}" for a, b in latency_rows(lat)) + "</table>")
        samples = lat.get("per_token_ms_samples") or lat.get("per_call_ms_samples")
        per = "per-token decode" if lat.get("per_token_ms_samples") else f"per-call ({lat.get('tokens')} tokens) encode"
        png = latency_plot(samples or [], f"{manifest['format']} {manifest['recipe']} on {latency['device'].get('hostname')}",
                           per)
        if png:
            parts.append(img(png, "per-token latency histogram"))
    parts.append("<h2>Files</h2><table><tr><th>file<th>bytes<th>sha256")
    parts += [f"<tr><td>{esc(k)}<td>{v['bytes']}<td><code>{v['sha256'][:16]}…</code>" for k, v in manifest["files"].items()]
    parts.append("</table>")
    return "\n".join(parts)


def write_reports(staging: Path, manifest: dict) -> None:
    """Write the bundle's report.md and report.html into ``staging``."""
    md = markdown(manifest)
    (staging / "report.md").write_text(md)
    (staging / "report.html").write_text(html_report(manifest, md))
