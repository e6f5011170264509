"""One device of a farm run: connect, check its runtime, deploy each bundle, run it, judge the results.

``DeviceRun(device, bundles, progress).execute()`` returns the device's DeviceReport and raises
nothing a device can cause: every step's outcome is a Check. It needs only a transport (how to run
commands and copy folders there), so the same steps serve whatever schedules devices (threads here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import DeviceError
from . import checks
from .bundles import RUNTIME_PACKAGE, Bundle, device_script, runtime_copy
from .farmfile import Device
from .results import BundleRun, Check, DeviceReport
from targets.transports import CANCELLED


def make_transport(device: Device):
    """The transport object for ``device``."""
    from targets.transports import LocalTransport, SshOptions, SshTransport

    if device.transport == "local":
        return LocalTransport(label=f"{device.name} (this machine)")
    if device.transport == "emulated":
        from ..emulate import transport

        return transport(device.board)
    opts = SshOptions(host=device.host or device.ssh_alias, port=device.port, user=device.user,
                      identity_file=device.identity_file, known_hosts=device.known_hosts,
                      first_contact=device.first_contact, ssh_config=device.ssh_config,
                      connect_timeout_s=device.connect_timeout_s, retries=device.retries)
    return SshTransport(opts)


def _is_interrupt(e: Exception) -> bool:
    return getattr(e, "kind", None) == "interrupted"


def _json_result(res, what: str) -> dict:
    """The JSON line a device-side command printed last (a DeviceError quoting its output if none)."""
    line = res.last_json_line()
    if line is None:
        tail = [ln for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
        raise DeviceError(f"{what} printed no result (exit {res.returncode}): {tail[-1][:300] if tail else 'no output'}")
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise DeviceError(f"{what} printed unreadable output: {line[:200]}") from None


def _python_problems(probe: dict) -> list[str]:
    """Why the device's Python cannot run the runtime at all (empty when it can)."""
    problems = []
    if not probe.get("python_ok"):
        problems.append(f"Python {probe.get('python')} is too old (3.9 or newer needed)")
    if not probe.get("numpy"):
        problems.append(f"numpy cannot be imported ({probe.get('numpy_error')}): pip install numpy")
    return problems


class DeviceRun:
    """Everything the farm does with one device, recorded as checks."""

    def __init__(self, device: Device, bundles: list[Bundle], progress: Callable[[str], None]):
        from targets import get_target

        self.device = device
        self.bundles = bundles
        self.progress = lambda m: progress(f"{device.name}: {m}")
        self.target = get_target(device.target)
        self.profile = self.target.device_profile
        self.transport = make_transport(device)
        self.capabilities = self.transport.capabilities
        self.report = DeviceReport(device.name, device.target, device.transport, self.transport.label)
        self.script = device_script()

    def python(self, *args) -> list[str]:
        """argv running the device script with the device's Python."""
        # --exit-on-stdin-eof: the command ends when its ssh client (or this process) goes away.
        return [self.device.python, "-c", self.script, "--exit-on-stdin-eof", *map(str, args)]

    # ------------------------------------------------------------ the device

    def execute(self) -> DeviceReport:
        """Connect, then every bundle in turn; the report's status and reason sum up its checks."""
        t0 = time.perf_counter()
        try:
            if self._connect():
                self._run_bundles()
        except DeviceError as e:
            self._down_or_fail(e)
        self.report.seconds = time.perf_counter() - t0
        self._verdict()
        return self.report

    def _run_bundles(self) -> None:
        for b in self.bundles:
            if CANCELLED.is_set():
                self._interrupted(f"before {b.label}")
            if self.report.status in ("down", "interrupted"):
                break
            self.report.runs.append(self._run_bundle(b))

    def _verdict(self) -> None:
        if self.report.status in ("down", "interrupted"):
            return
        failed = [f"{p + ': ' if p else ''}{c.name}" for p, c in self.report.all_checks()
                  if c.status in ("failed", "error")]
        if failed:
            self.report.status, self.report.reason = "failed", "failed checks: " + ", ".join(failed)
        elif self.capabilities.note:
            self.report.reason = self.capabilities.note  # e.g. an emulated row must not be read as the board's speed

    def _interrupted(self, where: str) -> None:
        self.report.status, self.report.reason = "interrupted", f"interrupted (Ctrl-C) {where}"

    def _down_or_fail(self, e: DeviceError) -> None:
        if _is_interrupt(e):
            self._interrupted("")
            self.report.checks.append(Check("connection", "interrupted", str(e)))
            return
        if getattr(e, "device_down", False):
            self.report.status = "down"
            self.report.reason = str(e)
        self.report.checks.append(Check("connection", "error", str(e)))

    # ------------------------------------------------------------ connect

    def _connect(self) -> bool:
        """Probe the device; True when its Python can run the runtime (else the checks say why not)."""
        t0 = time.perf_counter()
        self.progress(f"probe {self.transport.label}")
        try:
            res = self.transport.run(self._probe_argv(), self.device.probe_timeout_s, what="the device probe")
        except DeviceError as e:  # unreachable, untrusted, refused, or silent past the probe timeout
            self._unreachable(e, time.perf_counter() - t0)
            return False
        return self._probed(res, time.perf_counter() - t0)

    def _probe_argv(self) -> list[str]:
        fmt = self.bundles[0].format if self.bundles else "onnx"
        hook = self.profile.trtexec
        commands = list(hook.commands) if hook and self.device.trtexec else []
        return self.python("probe", fmt, *[x for c in commands for x in ("--trtexec", c)])

    def _unreachable(self, e: DeviceError, secs: float) -> None:
        interrupted = _is_interrupt(e)
        self.report.status, self.report.reason = ("interrupted", "interrupted (Ctrl-C) during the probe") \
            if interrupted else ("down", str(e))
        self.report.checks.append(Check("connect", "interrupted" if interrupted else "error", str(e), secs))

    def _probed(self, res, secs: float) -> bool:
        d, label = self.device, self.transport.label
        if res.returncode == 127 or (res.returncode != 0 and "No such file" in res.stderr):
            self.report.checks.append(Check("connect", "passed", f"reached {label}", secs))
            self.report.checks.append(Check(
                "python", "failed",
                f"python {d.python!r} is not found on {label}; set python = \"/path/to/python3\" "
                f"for device {d.name!r} (line {d.line} of the farm file)"))
            return False
        try:
            probe = _json_result(res, "the device probe")
        except DeviceError as e:
            self.report.checks.append(Check("connect", "passed", f"reached {label}", secs))
            self.report.checks.append(Check("python", "failed", f"{d.python}: {e.message}"))
            return False
        self.report.probe = probe
        self.report.checks.append(Check("connect", "passed", f"reached {label} "
                                        f"({probe.get('hostname')}, {probe.get('machine')})", secs, probe))
        problems = _python_problems(probe)
        self.report.checks.append(Check("python", "failed" if problems else "passed",
                                        "; ".join(problems) or f"Python {probe['python']}, numpy {probe['numpy']}"))
        return not problems

    # ------------------------------------------------------------ one bundle

    def _run_bundle(self, b: Bundle) -> BundleRun:
        """Runtime check, deploy, run and judge ``b``; the BundleRun holds every check."""
        run = BundleRun(str(b.path), b.label, b.format, b.manifest["recipe"],
                        int(b.manifest.get("artifact", {}).get("bytes", 0)))
        if b.format not in self.target.formats:
            run.checks.append(Check("format", "skipped", f"target {self.target.name} does not run "
                                    f"{b.format} (formats: {', '.join(self.target.formats)})"))
            return run
        if not self._runtime_check(b, run):
            return run
        try:
            dest = self._deploy(b, run)
            self._run(b, run, dest)
        except DeviceError as e:
            self._step_failed(e, b, run)
            return run
        if run.result:
            self._judge(b, run, dest)
        return run

    def _step_failed(self, e: DeviceError, b: Bundle, run: BundleRun) -> None:
        step = "run" if any(c.name == "deploy" for c in run.checks) else "deploy"
        if _is_interrupt(e):
            self._interrupted(f"during {step} of {b.label}")
            run.checks.append(Check(step, "interrupted", str(e)))
            return
        if getattr(e, "device_down", False):  # the device went away mid-way: down, with what it got to
            self.report.status, self.report.reason = "down", f"lost during {step} of {b.label}: {e}"
        run.checks.append(Check(step, "error", str(e)))

    def _runtime_check(self, b: Bundle, run: BundleRun) -> bool:
        """The format's runtime imports on the device (else a failed check naming what to install)."""
        fmt = b.format
        refused = self.capabilities.refused_formats.get(fmt)
        if refused:
            run.checks.append(Check("runtime", "skipped", refused))
            return False
        probe = self.report.probe
        if fmt != self.bundles[0].format:  # the first probe looked at another format: probe again
            res = self.transport.run(self.python("probe", fmt), self.device.probe_timeout_s, what="the device probe")
            probe = _json_result(res, "the device probe")
        if probe.get("runtime"):
            run.checks.append(Check("runtime", "passed", f"{probe['runtime']} {probe['runtime_version']}"))
            return True
        errors = probe.get("runtime_errors", {})
        pip = " or ".join(errors) or fmt
        hint = self.profile.runtime_pip_hint if fmt == "onnx" else None
        run.checks.append(Check(
            "runtime", "failed",
            f"this {fmt} bundle needs {pip} on the device, but {self.device.python} cannot import it "
            f"({'; '.join(str(v) for v in errors.values())[:300]}): {hint or 'pip install ' + list(errors or [fmt])[0]}"))
        return False

    def _deploy(self, b: Bundle, run: BundleRun) -> str:
        """Copy ``b`` and the runtime to the device atomically, unless an intact copy is there; its folder."""
        d = self.device
        dest = f"{d.workdir.rstrip('/')}/{b.deploy_name}"
        t0 = time.perf_counter()
        expected = json.dumps(b.files)
        # Already there and intact (same content hash in the name, every file re-hashed): skip the copy.
        res = self.transport.run(self.python("verify", dest, expected), d.copy_timeout_s, what="verifying the deployment")
        if res.returncode == 0 and _json_result(res, "verify").get("ok"):
            run.checks.append(Check("deploy", "passed", f"already deployed at {dest} (all {len(b.files)} files verified)",
                                    time.perf_counter() - t0, {"dest": dest, "copied": False}))
            return dest
        self.progress(f"deploy {b.label} -> {dest}")
        with tempfile.TemporaryDirectory(prefix="slm-farm-") as tmp:
            rt = runtime_copy(Path(tmp))
            self.transport.deploy({"bundle": b.path, RUNTIME_PACKAGE: rt}, dest, verify=self._verifier(expected),
                                  timeout=d.copy_timeout_s)
        run.checks.append(Check("deploy", "passed", f"{len(b.files)} files copied to {dest} and verified",
                                time.perf_counter() - t0, {"dest": dest, "copied": True}))
        return dest

    def _verifier(self, expected: str) -> Callable[[str], None]:
        """The transport's ``verify``: every file of the partial copy re-hashed on the device."""
        def verify(partial: str) -> None:
            v = self.transport.run(self.python("verify", partial, expected), self.device.copy_timeout_s,
                                   what="verifying the copy")
            out = _json_result(v, "verifying the copy")
            if not out.get("ok"):
                bad = ", ".join(f"{x['file']} ({x['problem']})" for x in out.get("bad", [])[:5])
                raise DeviceError(f"files arrived damaged: {bad}")
        return verify

    def _providers_for(self, b: Bundle, dest: str) -> tuple[list[str], dict]:
        """ONNX Runtime providers (the device's, else the target's) and their options for this run."""
        if b.format != "onnx":
            return [], {}
        providers = self.device.providers or list(self.profile.ort_providers)
        options = {}
        if providers and self.profile.provider_options:
            options = self.profile.provider_options(b.spec, f"{dest}/{self.profile.provider_cache_dir}")
        return providers, options

    def _run_argv(self, b: Bundle, dest: str) -> list[str]:
        d = self.device
        argv = self.python("run", "--support", dest, "--deadline", f"{d.timeout_s:g}",
                           f"{dest}/bundle", "--decode-tokens", d.decode_tokens, "--repeats", d.repeats,
                           "--warmup", d.warmup, "--parity")
        if d.threads:
            argv += ["--threads", str(d.threads)]
        providers, options = self._providers_for(b, dest)
        if providers:
            argv += ["--providers", ",".join(providers), "--provider-options", json.dumps(options)]
        return argv

    def _run(self, b: Bundle, run: BundleRun, dest: str) -> None:
        """Run the deployed bundle on the device; ``run.result`` is the runner's JSON when it succeeded."""
        d = self.device
        argv = self._run_argv(b, dest)
        self.progress(f"run {b.label} ({d.repeats} repeats x {d.decode_tokens} tokens, deadline {d.timeout_s:g} s)")
        t0 = time.perf_counter()
        # The device stops itself at the deadline; the local timeout only catches a device that went silent.
        res = self.transport.run(argv, d.timeout_s + max(30.0, d.connect_timeout_s * 3), what=f"the run of {b.label}")
        secs = time.perf_counter() - t0
        out = _json_result(res, f"the run of {b.label}")
        if "error" in out or res.returncode != 0:
            run.checks.append(Check("run", "failed", f"{out.get('error') or 'exit ' + str(res.returncode)}", secs, out))
            return
        run.result = out
        lat = out["latency"]
        run.checks.append(Check("run", "passed", f"{out['runtime']} {out['runtime_version']}: "
                                f"decode {lat.get('decode_tok_s', 0):.1f} tok/s, TTFT {lat.get('ttft_ms', 0):.1f} ms, "
                                f"peak RSS {lat.get('peak_rss_mb', 0):.0f} MB", secs,
                                {"latency": {k: v for k, v in lat.items() if not k.endswith("_samples")}}))

    def _judge(self, b: Bundle, run: BundleRun, dest: str) -> None:
        """The checks of a successful run, in report order (trtexec runs last: it times the device again)."""
        results = [checks.parity(b, run.result),
                   checks.budget(run.result, self.target, self.device.budgets, self.capabilities),
                   checks.providers(run.result, self.profile)]
        if self.device.trtexec:
            results.append(checks.trtexec(b, dest, self.report.probe, self.profile, self._run_trtexec))
        run.checks += [c for c in results if c is not None]

    def _run_trtexec(self, argv: list[str]):
        return self.transport.run(argv, self.device.timeout_s, what="trtexec")
