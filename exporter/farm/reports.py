"""The farm's reports: JSON, JUnit XML and an HTML page with plots, from the devices' DeviceReports."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from ..errors import SlmExportError
from ..htmlpage import VERDICT_CSS, esc, figure_png, img, page_head, pyplot
from .farmfile import Farm
from .results import BundleRun, DeviceReport

STATUS_CSS = (".failed,.error,.down{color:#b00}.passed{color:#070}.skipped{color:#777}"
              ".interrupted{color:#a60}.row{display:flex;gap:1.5em;flex-wrap:wrap}img{max-width:100%}" + VERDICT_CSS)
PLOTS = (("latency", "per-token latency by device and format"), ("size_parity", "size vs parity error"))


def to_json(reports: list[DeviceReport], farm: Farm | None = None) -> dict:
    """The JSON report: every device, check and runner result."""
    return {
        "schema": "slm-export/farm/1",
        "farm": str(farm.path) if farm else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": {s: sum(r.status == s for r in reports) for s in ("passed", "failed", "down", "interrupted")},
        "devices": [dataclasses.asdict(r) for r in reports],
    }


# ---------------------------------------------------------------- JUnit XML


def junit_xml(reports: list[DeviceReport]) -> str:
    """JUnit XML: one testsuite per device, one testcase per check; a down device is an error, and so is
    a check cut short by Ctrl-C (type "interrupted")."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="slm-export farm")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in reports:
        for k, v in _junit_suite(root, r).items():
            totals[k] += v
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _junit_suite(root, r: DeviceReport) -> dict:
    """Add the testsuite of device ``r`` under ``root``; its counts."""
    import xml.etree.ElementTree as ET

    suite = ET.SubElement(root, "testsuite", name=f"farm.{r.name}", hostname=r.label, time=f"{r.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("target", r.target), ("transport", r.transport), ("status", r.status), ("reason", r.reason)):
        ET.SubElement(props, "property", name=k, value=str(v))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for prefix, c in r.all_checks():
        case = ET.SubElement(suite, "testcase", classname=f"farm.{r.name}",
                             name=f"{prefix} {c.name}".strip(), time=f"{c.seconds:.3f}")
        counts["tests"] += 1
        if c.status == "failed":
            ET.SubElement(case, "failure", message=c.message[:500]).text = c.message
            counts["failures"] += 1
        elif c.status in ("error", "interrupted"):
            ET.SubElement(case, "error", message=c.message[:500], type=c.status).text = c.message
            counts["errors"] += 1
        elif c.status == "skipped":
            ET.SubElement(case, "skipped", message=c.message[:500])
            counts["skipped"] += 1
        else:
            ET.SubElement(case, "system-out").text = c.message
    for k, v in counts.items():
        suite.set(k, str(v))
    return counts


# ---------------------------------------------------------------- plots


def _plots(reports: list[DeviceReport]) -> dict[str, str]:
    """Base64 PNGs: per-token latency per device and format; artifact size vs parity error."""
    out = {}
    latency, size_parity = _latency_plot(reports), _size_parity_plot(reports)
    if latency:
        out["latency"] = latency
    if size_parity:
        out["size_parity"] = size_parity
    return out


def _latency_plot(reports: list[DeviceReport]) -> str | None:
    series = [(f"{r.name}\n{run.label}", run.result["latency"].get("per_token_ms_samples") or [])
              for r in reports for run in r.runs if run.result]
    series = [(k, v) for k, v in series if v]
    if not series:
        return None
    fig, ax = pyplot().subplots(figsize=(max(5, 1.6 * len(series)), 3.5))
    ax.boxplot([v for _, v in series], showfliers=True)
    ax.set_xticks(range(1, len(series) + 1), [k for k, _ in series], fontsize=8)
    ax.set_yscale("log")  # tails (page faults, other load) span decades; a log axis keeps the boxes readable
    ax.set_ylabel("per-token decode latency (ms, log)")
    ax.set_title("decode latency by device and format")
    return figure_png(fig)


def _size_parity_plot(reports: list[DeviceReport]) -> str | None:
    points = [(r.name, run.label, run.artifact_bytes / 1e6, run.result["parity"].get("max_abs_err"))
              for r in reports for run in r.runs if run.result and run.result.get("parity")]
    points = [p for p in points if p[3] is not None]
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5))
    for name in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == name]
        ax.scatter([p[2] for p in mine], [max(p[3], 1e-6) for p in mine], label=name)
        for p in mine:
            ax.annotate(p[1], (p[2], max(p[3], 1e-6)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("max |logit error| on the device")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("size vs parity error")
    return figure_png(fig)


# ---------------------------------------------------------------- HTML


def html_report(reports: list[DeviceReport], farm: Farm | None = None) -> str:
    """One HTML page: the verdict with one row per device, a row per device and bundle run, the two plots
    and each device's checks.

    Every value from a device (probe, runner output), a bundle or the farm file is escaped: a
    bundle is untrusted input, and a hostname such as ``<script>`` must stay text.
    """
    parts = [page_head("slm-export farm", width="70em", css=STATUS_CSS, cell_css=";vertical-align:top"),
             f"<h1>Device farm{': ' + esc(farm.path) if farm else ''}</h1>"]
    parts += _verdict(reports)
    parts += ["<h2>Runs</h2>"] + _summary_table(reports)
    plots = _plots(reports)
    parts += ["<div class=row>"] + [f"<div><h2>{alt}</h2>{img(plots[key], alt)}</div>"
                                     for key, alt in PLOTS if key in plots] + ["</div>"]
    for r in reports:
        parts += _device_section(r)
    return "\n".join(parts)


def _verdict(reports: list[DeviceReport]) -> list[str]:
    """The box at the top: passed only when every device passed; one row per device with its verdict and why."""
    bad = [r for r in reports if r.status != "passed"]
    counts = ", ".join(f"{n} {s}" for s in ("passed", "failed", "down", "interrupted")
                       if (n := sum(r.status == s for r in reports)))
    word = "passed" if reports and not bad else "FAILED" if reports else "no devices"
    parts = [(f"<div class='verdict {'fail' if bad or not reports else 'pass'}'><h2>Verdict: {word}</h2>"
             f"<p>{len(reports)} device{'s' if len(reports) != 1 else ''}: {esc(counts)}</p>"),
             "<table><tr><th>device<th>target<th>verdict<th>why"]
    for r in reports:
        why = "; ".join(_failed_checks(r)) or r.reason or "every check passed"
        parts.append(f"<tr><td>{esc(r.name)}<td>{esc(r.target)}<td class='{esc(r.status)}'>{esc(r.status)}"
                     f"<td>{esc(why)}")
    return parts + ["</table></div>"]


def _failed_checks(r: DeviceReport) -> list[str]:
    """"<bundle> <check>: <message>" of each check of ``r`` that did not pass or get skipped (messages cut short)."""
    return [f"{prefix} {c.name}".strip() + (f": {_cut(c.message, 200)}" if c.message else "")
            for prefix, c in r.all_checks() if c.status not in ("passed", "skipped")]


def _cut(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters, with an ellipsis when it was longer (the device's section has it all)."""
    return text if len(text) <= n else text[:n].rstrip() + "…"


def _runtime_cell(run: BundleRun) -> str:
    return f"{run.label} on {run.result.get('runtime')} {run.result.get('runtime_version')}"


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else ""


def _summary_table(reports: list[DeviceReport]) -> list[str]:
    """One row per device and bundle run (one per device that ran nothing)."""
    parts = [("<table><tr><th>device<th>target<th>reached as<th>status<th>runtime<th>decode tok/s<th>TTFT ms"
             "<th>peak RSS MB<th>max |logit err|<th>top-1<th>reason")]
    for r in reports:
        for run in [run for run in r.runs if run.result] or [None]:
            lat = run.result["latency"] if run else {}
            par = (run.result.get("parity") or {}) if run else {}
            parts.append(
                f"<tr><td>{esc(r.name)}<td>{esc(r.target)}<td>{esc(r.label)}<td class='{esc(r.status)}'>{esc(r.status)}"
                f"<td>{esc(_runtime_cell(run)) if run else ''}"
                f"<td>{_num(lat.get('decode_tok_s'), '{:.1f}')}<td>{_num(lat.get('ttft_ms'), '{:.1f}')}"
                f"<td>{_num(lat.get('peak_rss_mb'), '{:.0f}')}<td>{_num(par.get('max_abs_err'), '{:.3g}')}"
                f"<td>{_num(par.get('top1_agreement'), '{:.3f}')}<td>{esc(r.reason)}")
    parts.append("</table>")
    return parts


def _device_section(r: DeviceReport) -> list[str]:
    """A device's heading, what its probe found, and every check."""
    parts = [f"<h2>{esc(r.name)} <span class='{esc(r.status)}'>{esc(r.status)}</span></h2>"]
    dev = r.probe
    if dev:
        parts.append(f"<p>{esc(dev.get('hostname'))}: {esc(dev.get('machine'))}, {esc(dev.get('os'))}, "
                     f"Python {esc(dev.get('python'))}, {esc(dev.get('cpu_count'))} CPUs</p>")
    parts.append("<table><tr><th>bundle<th>check<th>status<th>seconds<th>message")
    for prefix, c in r.all_checks():
        parts.append(f"<tr><td>{esc(prefix)}<td>{esc(c.name)}<td class='{esc(c.status)}'>{esc(c.status)}"
                     f"<td>{c.seconds:.2f}<td>{esc(c.message)}")
    parts.append("</table>")
    return parts


# ---------------------------------------------------------------- files


def check_report_paths(paths: dict[str, Path | None]) -> None:
    """Make sure every requested report (option name -> path) can be written, before any device work.

    A farm run can take an hour; finding out at the end that ``--json`` points into a read-only
    folder would lose every result. The parent folder is created (as ``write_reports`` would) and
    a probe file is written in it and removed.
    """
    problems = []
    for option, path in paths.items():
        if not path:
            continue
        try:
            _probe_writable(Path(path))
        except OSError as e:
            problems.append(f"{option} {Path(path)}: {e.strerror or e}")
    if problems:
        raise SlmExportError("cannot write the report" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
                             hint="choose a path in a folder you can write; no device was contacted")


def _probe_writable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, "a"):
            pass
    else:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass


def write_reports(reports: list[DeviceReport], farm: Farm | None = None, junit: Path | None = None,
                  json_path: Path | None = None, html_path: Path | None = None) -> None:
    """Write whichever reports were asked for (parent folders are created)."""
    for path, make in ((junit, lambda: junit_xml(reports)),
                       (json_path, lambda: json.dumps(to_json(reports, farm), indent=2, default=str)),
                       (html_path, lambda: html_report(reports, farm))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(make())
