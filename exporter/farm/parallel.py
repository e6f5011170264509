"""The whole farm: every device's DeviceRun in a thread pool, and Ctrl-C that still yields reports.

A device thread spends its time waiting on ssh / scp / a local runner, so threads are enough here;
this module is the only one that knows how devices are scheduled.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from ..errors import DeviceError, SlmExportError
from .bundles import Bundle, load_bundle, runtime_copy
from .device_run import DeviceRun
from .farmfile import Device, Farm
from .results import Check, DeviceReport, device_report
from targets.transports import CANCELLED

# After Ctrl-C, how long the device threads get to notice, remove partial folders and record results.
STOP_GRACE_S = 15.0


class FarmInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during ``run_farm``; ``reports`` holds every device, finished or not."""

    def __init__(self, reports: list[DeviceReport]):
        super().__init__("interrupted")
        self.reports = reports

    @property
    def finished(self) -> int:
        """How many devices got to the end (passed, failed or down) before the interrupt."""
        return sum(r.status != "interrupted" for r in self.reports)


def run_farm(farm: Farm, bundle_dirs: list[str | Path], only: list[str] | None = None,
             progress: Callable[[str], None] = lambda m: None, max_workers: int = 8) -> list[DeviceReport]:
    """Deploy and check every bundle on every device of ``farm`` (devices in parallel)."""
    devices = select_devices(farm, only)
    bundles = load_bundles(bundle_dirs)
    from targets.transports import reset_cancel

    reset_cancel()
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(devices))))
    futures = [pool.submit(run_device, d, bundles, progress) for d in devices]
    try:
        _wait_all(futures)
    except KeyboardInterrupt:
        raise FarmInterrupted(_stop(pool, futures, devices)) from None
    pool.shutdown()
    return [f.result() for f in futures]


def select_devices(farm: Farm, only: list[str] | None) -> list[Device]:
    """The farm's devices, or those named in ``only`` (an error naming any that the farm lacks)."""
    devices = [d for d in farm.devices if not only or d.name in only]
    if only and len(devices) != len(set(only)):
        unknown = sorted(set(only) - {d.name for d in farm.devices})
        raise SlmExportError(f"no device called {', '.join(unknown)} in {farm.path}",
                             hint=f"devices: {', '.join(d.name for d in farm.devices)}")
    return devices


def load_bundles(bundle_dirs: list[str | Path]) -> list[Bundle]:
    """Every bundle, verified and hashed (with the runtime copy it will be deployed with)."""
    if not bundle_dirs:
        raise SlmExportError("no bundle given", hint="pass --bundle DIR (a folder written by slm-export)")
    with tempfile.TemporaryDirectory(prefix="slm-farm-rt-") as tmp:
        rt = runtime_copy(Path(tmp))
        return [load_bundle(p, rt) for p in bundle_dirs]


def run_device(device: Device, bundles: list[Bundle], progress: Callable[[str], None]) -> DeviceReport:
    """One device's report; whatever goes wrong there ends up in the report, never raised."""
    if CANCELLED.is_set():
        return _not_finished(device)
    try:
        return DeviceRun(device, bundles, progress).execute()
    except DeviceError as e:  # e.g. no ssh client: this device is down, the others go on
        return device_report(device, "down", str(e), Check("connect", "error", str(e)))
    except Exception as e:  # noqa: BLE001 - one device's bug must not hide the others' results
        return device_report(device, "failed", f"internal error: {type(e).__name__}: {e}",
                             Check("farm", "error", f"{type(e).__name__}: {e}"))


def _wait_all(futures) -> None:
    # A bounded wait in a loop, never one blocking join: the main thread must get back to Python
    # code often, or Ctrl-C would only be delivered once every device is done.
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)


def _stop(pool: ThreadPoolExecutor, futures, devices: list[Device]) -> list[DeviceReport]:
    """Cancel the farm: kill every running step, let the device threads clean up briefly, collect."""
    from targets.transports import cancel

    cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        wait([f for f in futures if not f.cancelled()], timeout=STOP_GRACE_S)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, kill whatever started since
        cancel()
    return [f.result() if f.done() and not f.cancelled() else _not_finished(d) for f, d in zip(futures, devices)]


def _not_finished(device: Device) -> DeviceReport:
    msg = "interrupted (Ctrl-C) before this device finished"
    return device_report(device, "interrupted", msg, Check("farm", "interrupted", msg))
