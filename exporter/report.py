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
    ("label_agreement", "label agreement", "{:.4f}"),
    ("texts", "texts classified", "{}"),
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
              "greedy_identical": ("required", "greedy_identical"), "cosine_min": (">= ", "encoder_cosine_min"),
              "label_agreement": (">= ", "label_agreement_min")}
    rows = []
    encoder = "cosine_min" in metrics  # hidden states compared, not logits
    for key, label, fmt in PARITY_ROWS:
        if key not in metrics or metrics[key] is None:
            continue
        if encoder:
            label = label.replace("logit error", "hidden-state error")
        elif "label_agreement" in metrics:
            label = label.replace("logit error", "label-logit error")
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


def reference_line(ref: dict) -> str:
    """One sentence on how the PyTorch reference was checked (exporter/reference.py)."""
    if "ppl" not in ref:
        return f"not checked ({ref.get('why', '')})"
    text = (f"perplexity {ref['ppl']:.2f} on the English eval text"
            + (f" (plausible below {ref['ppl_bound']:g} for its size)" if ref.get("checked") else f"; not judged: {ref.get('why')}"))
    cc = ref.get("llama_cpp")
    if cc and cc.get("checked"):
        text += (f"; llama.cpp {cc['version']} on the same GGUF: top-1 agreement {cc['top1_agreement']:.3f}, "
                 f"perplexity {cc['ppl_llama_cpp']:.2f} ({cc['ppl_rel_change']:+.1%}), tokenization "
                 + ("identical" if cc["tokens_identical"] else "DIFFERENT"))
    elif cc:
        text += f"; not cross-checked with llama.cpp: {cc.get('why')}"
    return text


def markdown(manifest: dict) -> str:
    """The bundle's report.md."""
    m = manifest
    if "distillation" in m:  # the mcu's distilled classifier: student figures instead of a model's
        lines = intent_lines(m)
    else:
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
        reference = "the float32 student" if "distillation" in m else "PyTorch fp32"
        lines += ["", f"## Parity against {reference} ({verdict})", "", "| metric | value | threshold |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in parity_rows(parity)]
        met = parity["metrics"]
        if "greedy_reference_text" in met:
            lines += ["", f"Greedy {met['greedy_tokens']} tokens, PyTorch: {met['greedy_reference_text']!r}",
                      f"Greedy, artifact: {met['greedy_artifact_text']!r}"]
    if m.get("reference"):
        lines += ["", "Reference check: " + reference_line(m["reference"])]
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
    if "flash" in m:
        lines += memory_lines(m)
    budgets = m.get("budget_failures")
    if budgets:
        lines += ["", "Target budgets missed on this machine (budgets apply on the device): " + "; ".join(budgets)]
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def accuracy_rows(manifest: dict) -> list[tuple[str, str]]:
    """(model, held-out accuracy) rows of a distilled classifier: teacher, float student, int8 artifact."""
    p = manifest["parity"]["metrics"]
    return [("teacher (all-MiniLM-L6-v2, nearest intent prototype)", _pct(p["accuracy_teacher"])),
            ("student float32 (PyTorch)", _pct(p["accuracy_float"])),
            ("student int8-full (TFLite Micro)", _pct(p["accuracy_int8"]))]


def memory_rows(manifest: dict) -> list[tuple[str, str, str]]:
    """(figure, bytes, budget) rows of what a microcontroller bundle needs of the board."""
    fl, ar, b = manifest["flash"], manifest["arena"], manifest.get("budget", {})
    return [("flash: model.tflite", str(fl["model_bytes"]), ""),
            ("flash: vocabulary + embedding + labels", str(fl["tables_bytes"]), ""),
            ("flash: total", str(fl["total_bytes"]), str(b.get("flash_bytes_max", ""))),
            (f"RAM: TFLite Micro tensor arena (head {ar.get('head')}, tail {ar.get('tail')})", str(ar["total"]),
             str(b.get("ram_bytes_max", "")))]


def intent_lines(m: dict) -> list[str]:
    """The head of a distilled classifier's report.md: title, student and split, held-out accuracy."""
    dist = m["distillation"]
    lines = [f"# Intent classifier -> {m['format']} / {m['recipe']} for {m['target']} ({m.get('board')})", "",
             f"- created {m['created']}; student {dist['parameters']} parameters, {dist['intents']} intents, "
             f"trained on {dist['train_examples']} commands (teacher {m['model']['teacher']})",
             f"- held-out split: {dist['test_examples']} commands from templates the student never saw",
             "", "## Held-out accuracy", "", "| model | accuracy |", "|---|---|"]
    return lines + [f"| {a} | {b} |" for a, b in accuracy_rows(m)] + [""]


def memory_lines(m: dict) -> list[str]:
    """The memory and files sections of a microcontroller bundle's report.md."""
    lines = ["", "## Memory (budget of the board profile)", "", "| figure | bytes | budget |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in memory_rows(m)]
    verified = "succeeded" if m["arena"].get("verified") else "FAILED (add a margin)"
    return lines + [
        "", f"The arena figure is TFLite Micro's RecordingMicroAllocator total; a run with exactly that arena {verified}.",
        "", "## Files", "",
        "- `model_data.h` / `model_data.cc`: the model as `g_model_data` (16-byte aligned) for `tflite::GetModel`",
        "- `intent_vocab.h` / `intent_vocab.cc`: tokenizer tables and labels (the tokenization rule is in the header)",
        "- `model.tflite`, `labels.txt`, `vocab.txt`, `intent_model.json`"]


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
    if "flash" in manifest:  # a microcontroller bundle: held-out accuracy and what it needs of the board
        parts.append("<h2>Held-out accuracy</h2><table><tr><th>model<th>accuracy")
        parts += [f"<tr><td>{esc(a)}<td>{esc(b)}" for a, b in accuracy_rows(manifest)]
        parts.append("</table><h2>Memory</h2><table><tr><th>figure<th>bytes<th>budget")
        parts += [f"<tr><td>{esc(a)}<td>{esc(b)}<td>{esc(c)}" for a, b, c in memory_rows(manifest)]
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
    """report.md and report.html of ``manifest`` into the bundle folder ``staging``."""
    md = markdown(manifest)
    (staging / "report.md").write_text(md)
    (staging / "report.html").write_text(html_report(manifest, md))
