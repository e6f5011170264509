"""The sweep's summary: one row per cell (status, size, top-1, perplexity change, decode tok/s, time),
as ``OUT/summary.json``, ``OUT/summary.html`` (exporter/htmlpage.py's skeleton) and a rich table."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from ..htmlpage import VERDICT_CSS, esc, human_bytes, page_head
from .cell import OK, SKIPPED

COLUMNS = ("cell", "status", "size", "top-1", "ppl change", "decode tok/s", "time", "note")
GOOD = (OK, SKIPPED)


def rows(run, order: list[str]) -> list[tuple[str, ...]]:
    """The table's cells as text, in ``order`` (the matrix order)."""
    out = []
    for name in order:
        r = run.results.get(name, {"status": "?"})
        f = r.get("figures") or {}
        size = human_bytes(f["bytes"]) if f.get("bytes") else ""
        top1 = f"{f['top1_agreement']:.3f}" if isinstance(f.get("top1_agreement"), (int, float)) else ""
        ppl = f"{f['ppl_rel_change']:+.2%}" if isinstance(f.get("ppl_rel_change"), (int, float)) else ""
        tok = f"{f['decode_tok_s']:.1f}" if isinstance(f.get("decode_tok_s"), (int, float)) else ""
        took = f"{r['seconds']:.1f} s" if isinstance(r.get("seconds"), (int, float)) else ""
        if r.get("attempts", 1) > 1:
            took += f" ({r['attempts']} attempts)"
        note = r.get("error") or "; ".join(f.get("failures") or []) or r.get("note", "")
        out.append((name, r["status"], size, top1, ppl, tok, took, note))
    return out


def to_json(run, sweep, out: Path) -> dict:
    """summary.json: the sweep, how it ran, and every cell's result (figures and parity metrics whole)."""
    return {"schema": "slm-export/sweep/1",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sweep_file": str(sweep.path), "out": str(out), "backend": run.backend, "workers": run.workers,
            "seconds": round(run.seconds, 2), "notes": run.notes,
            "counts": counts(run),
            "cells": [{"cell": c.name, "model": c.model.name, "model_spec": c.model.spec, "target": c.target,
                       "format": c.format, "recipe": c.recipe, **run.results.get(c.name, {})} for c in sweep.cells]}


def counts(run) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in run.results.values():
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def html_page(run, sweep, out: Path) -> str:
    """summary.html: the verdict, then one row per cell (each bundle's report.html linked)."""
    order = [c.name for c in sweep.cells]
    bad = [n for n in order if run.results.get(n, {}).get("status") not in GOOD]
    verdict = (f"<div class='verdict {'fail' if bad else 'pass'}'><h2>{len(order) - len(bad)} of {len(order)} cells "
               f"ok</h2>{'<p>not ok: ' + esc(', '.join(bad)) + '</p>' if bad else ''}"
               f"<p>{esc(run.backend)}, {run.workers} worker(s), {run.seconds:.0f} s</p></div>")
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = []
    for row in rows(run, order):
        name = row[0]
        link = f"<a href='{esc(name)}/report.html'>{esc(name)}</a>" if (out / name / "report.html").exists() else esc(name)
        cls = "ok" if row[1] in GOOD else "bad"
        body.append(f"<tr class='{cls}'><td>{link}</td>" + "".join(f"<td>{esc(v)}</td>" for v in row[1:]) + "</tr>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in run.notes)
    return (page_head(f"sweep {sweep.path.name}", "80em", VERDICT_CSS + "tr.bad td{background:#fdf2f2}")
            + f"<h1>sweep {esc(sweep.path.name)}</h1>{verdict}<table><tr>{head}</tr>{''.join(body)}</table>"
            + (f"<ul>{notes}</ul>" if notes else ""))


def write(run, sweep, out: Path) -> None:
    """summary.json and summary.html in ``out`` (each written whole: temp file, then rename)."""
    for name, text in (("summary.json", json.dumps(to_json(run, sweep, out), indent=2, default=str)),
                       ("summary.html", html_page(run, sweep, out))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def table(run, sweep):
    """The rich table printed at the end of a sweep."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"sweep {sweep.path.name}: {run.backend}, {run.workers} worker(s), {run.seconds:.0f} s")
    for col in COLUMNS:
        t.add_column(col, overflow="fold", no_wrap=col == "cell")
    for row in rows(run, [c.name for c in sweep.cells]):
        style = "" if row[1] in GOOD else "red"
        t.add_row(Text(row[0]), Text(row[1], style=style), *row[2:-1], Text(row[-1]))  # Text: not markup
    return t
