"""The device farm: deploy bundles to every device of a farm file, run them there, report.

    slm-export farm run FARM.toml --bundle DIR [--bundle DIR2] [--junit F] [--json F] [--html F]
    pytest device_tests --farm FARM.toml --bundle DIR

A farm file (TOML) lists devices; each names its target (``rpi``, ``jetson``, ``host``...), how to
reach it (``local`` or ``ssh``) and the Python to run the bundle with. For every device, in parallel:

1. connect: probe the device (``python -c <exporter/farm_device.py> probe``): Python, numpy, the
   format's runtime, ONNX Runtime providers, trtexec. A device that cannot be reached or trusted
   is reported *down* with the reason; the others still run.
2. runtime: the format's runtime is importable (else the message names the pip package).
3. deploy: the bundle and the device-side runtime (``exporter/runtime`` as package ``slm_runtime``)
   are copied atomically and every file's sha256 is checked on the device before it is used.
4. run: ``slm_runtime.main.run`` with a deadline: latency, peak RSS, parity against the bundle's
   shipped reference outputs, runtime version, device identity.
5. parity: the device's figures against the recipe's thresholds.
6. budget: the latency figures against the target's budgets (a device may tighten or relax them).
7. providers / trtexec: targets that declare ONNX Runtime execution providers (``targets/jetson.py``)
   must really use them; ``trtexec`` times the .onnx when the device has it.

Results are written as JUnit XML, JSON and an HTML page with plots.

The package, one module a concern (each imports only those above it):

* ``farmfile``: the farm file (Device, Farm, load_farm, FarmFileError and the field checks);
* ``bundles``: what is deployed (Bundle, load_bundle, runtime_copy, the device script);
* ``results``: Check, BundleRun, DeviceReport (plain data: all that the reports read);
* ``checks``: parity, budget, providers, trtexec, each a function of a run's results;
* ``device_run``: DeviceRun, one device's steps 1-7 over its transport;
* ``parallel``: run_farm, every device in a thread pool, and Ctrl-C (FarmInterrupted);
* ``reports``: to_json, junit_xml, html_report, check_report_paths, write_reports.

What a target does differently (providers, trtexec) is its ``Target.device_profile``; what a
transport's figures are worth is its ``capabilities``.
"""

from __future__ import annotations

from .bundles import DEVICE_SCRIPT, RUNTIME_DIR, RUNTIME_PACKAGE, Bundle, device_script, load_bundle, runtime_copy
from .device_run import DeviceRun, make_transport
from .farmfile import SECRET_FIELDS, TRANSPORTS, Device, Farm, FarmFileError, load_farm
from .parallel import STOP_GRACE_S, FarmInterrupted, load_bundles, run_device, run_farm, select_devices
from .reports import check_report_paths, html_report, junit_xml, to_json, write_reports
from .results import BundleRun, Check, DeviceReport

__all__ = [
    "DEVICE_SCRIPT", "RUNTIME_DIR", "RUNTIME_PACKAGE", "SECRET_FIELDS", "STOP_GRACE_S", "TRANSPORTS",
    "Bundle", "BundleRun", "Check", "Device", "DeviceReport", "DeviceRun", "Farm", "FarmFileError",
    "FarmInterrupted", "check_report_paths", "device_script", "html_report", "junit_xml",
    "load_bundle", "load_bundles", "load_farm", "make_transport", "run_device", "run_farm",
    "runtime_copy", "select_devices", "to_json", "write_reports",
]
