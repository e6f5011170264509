"""What a farm run records: checks, per-bundle runs and per-device reports (plain, JSON-able data).

These are the only things the reports read, so a run that happens elsewhere (another process, a
cluster worker) only has to send these back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    """One verdict about a device: passed | failed | error | skipped | interrupted (Ctrl-C)."""

    name: str
    status: str
    message: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


@dataclass
class BundleRun:
    """One bundle on one device: its checks, and the device runner's JSON when the run got that far."""

    bundle: str  # the bundle folder
    label: str  # "<format>/<recipe>"
    format: str
    recipe: str
    artifact_bytes: int
    checks: list[Check] = field(default_factory=list)
    result: dict | None = None  # the device runner's JSON


@dataclass
class DeviceReport:
    """Everything the farm learnt about one device: its own checks, one BundleRun per bundle, a verdict."""

    name: str
    target: str
    transport: str
    label: str
    status: str = "passed"  # passed | failed | down | interrupted (Ctrl-C before the device finished)
    reason: str = ""
    checks: list[Check] = field(default_factory=list)  # device-level checks (connect, python)
    runs: list[BundleRun] = field(default_factory=list)
    probe: dict = field(default_factory=dict)
    seconds: float = 0.0

    def all_checks(self) -> list[tuple[str, Check]]:
        """(prefix, check) for every check, device-level first."""
        out = [("", c) for c in self.checks]
        for r in self.runs:
            out += [(r.label, c) for c in r.checks]
        return out


def device_report(device, status: str, reason: str, check: Check) -> DeviceReport:
    """The report of a device that got no further than one device-level check (down, crashed, interrupted)."""
    return DeviceReport(device.name, device.target, device.transport, device.host or device.name,
                        status=status, reason=reason, checks=[check])
