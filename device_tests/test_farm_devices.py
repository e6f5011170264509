"""One test per device of the farm: it must be reachable and pass every check on every bundle."""

from __future__ import annotations


def _describe(report) -> str:
    lines = [f"{report.name} ({report.target} via {report.label}): {report.status}"]
    if report.reason:
        lines.append(f"  reason: {report.reason}")
    for prefix, check in report.all_checks():
        lines.append(f"  [{check.status:7}] {prefix + ' ' if prefix else ''}{check.name}: {check.message}")
    return "\n".join(lines)


def test_device(device_name, farm_reports):
    report = farm_reports[device_name]
    assert report.status != "down", _describe(report)
    assert report.status == "passed", _describe(report)
    assert any(c.name == "run" and c.status == "passed" for _, c in report.all_checks()), _describe(report)
