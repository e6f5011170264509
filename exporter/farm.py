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
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import re
import shutil
import tempfile
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from .bundle import sha256
from .errors import DeviceError, SlmExportError
from targets.transports import CANCELLED

DEVICE_SCRIPT = Path(__file__).with_name("farm_device.py")
RUNTIME_DIR = Path(__file__).with_name("runtime")
RUNTIME_PACKAGE = "slm_runtime"  # the name exporter/runtime gets on the device (it imports only relatively)

SECRET_FIELDS = {"password", "passphrase", "private_key", "secret", "token", "key", "ssh_password",
                 "sudo_password", "identity", "private_key_data"}
TRANSPORTS = ("local", "ssh", "emulated")  # emulated: an ARM64 board under QEMU (exporter/emulate.py)


# ---------------------------------------------------------------- the farm file


@dataclass
class Device:
    """One device of a farm file (defaults already merged)."""

    name: str
    target: str
    transport: str = "ssh"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    ssh_alias: str | None = None  # a Host of the user's ssh_config instead of host/port/user
    identity_file: str | None = None  # path to a private key (never the key itself)
    known_hosts: str | None = None
    first_contact: bool = False  # StrictHostKeyChecking=accept-new: trust an UNKNOWN key once
    ssh_config: str | None = None
    python: str = "python3"
    workdir: str = "slm-export-farm"  # relative to the login home, or absolute
    threads: int | None = None
    decode_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    connect_timeout_s: float = 10.0
    timeout_s: float = 1800.0  # the run step's deadline (enforced on the device and here)
    probe_timeout_s: float = 120.0
    copy_timeout_s: float = 1800.0
    retries: int = 2
    budgets: dict = field(default_factory=dict)  # overrides of the target's Budgets fields
    providers: list | None = None  # ONNX Runtime providers; default: the target's
    trtexec: bool = True  # time the .onnx with trtexec when the target asks and the device has it
    board: str | None = None  # transport "emulated": pi4 | pi5 | android-arm64 (slm-export device emulate)
    line: int = 0  # where the device starts in the farm file


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Device) if f.name != "line"}
NUMBER_FIELDS = {"connect_timeout_s", "timeout_s", "probe_timeout_s", "copy_timeout_s"}
INT_FIELDS = {"port", "threads", "decode_tokens", "repeats", "warmup", "retries"}
BOOL_FIELDS = {"first_contact", "trtexec"}
PATH_FIELDS = {"identity_file", "known_hosts", "ssh_config"}
POSITIVE = {"decode_tokens", "repeats", "connect_timeout_s", "timeout_s", "probe_timeout_s", "copy_timeout_s"}


@dataclass
class Farm:
    path: Path
    devices: list[Device]


class FarmFileError(SlmExportError):
    """The farm file is not valid; the message names the file, line and field."""


def _key_line(lines: list[str], block: tuple[str, int] | None, key: str) -> int:
    """1-based line of ``key = ...`` inside table ``block`` ("device", index) or ("defaults", 0).

    tomllib reports no positions for keys, so the file text is scanned: table headers delimit the
    blocks; subtables such as ``[device.budgets]`` belong to the block above them.
    """
    current, index, start = None, -1, 0
    key_re = re.compile(rf'^\s*("{re.escape(key)}"|\'{re.escape(key)}\'|{re.escape(key)})\s*=')
    inline_re = re.compile(rf'[{{,]\s*{re.escape(key)}\s*=')
    header_re = re.compile(rf'^\s*\[+\s*[^\]]*\.{re.escape(key)}\s*\]+')
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0] if '"' not in raw and "'" not in raw else raw
        stripped = line.strip()
        if stripped.startswith("[[device]]"):
            current, index, start = "device", index + 1, n
        elif stripped.startswith("[defaults]"):
            current, start = "defaults", n
        elif stripped.startswith("[") and not stripped.startswith("[device.") and not stripped.startswith("[defaults."):
            current = stripped
        if block is None or (current == block[0] and (block[0] != "device" or index == block[1])):
            if key_re.match(line) or inline_re.search(line) or header_re.match(line):
                return n
    if block and block[0] == "device":
        return _device_start(lines, block[1])
    return start or 1


def _device_start(lines: list[str], index: int) -> int:
    seen = -1
    for n, raw in enumerate(lines, 1):
        if raw.strip().startswith("[[device]]"):
            seen += 1
            if seen == index:
                return n
    return 1


def load_farm(path: str | Path) -> Farm:
    """Parse and validate a farm file; any mistake is a FarmFileError naming line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FarmFileError(f"cannot read farm file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FarmFileError(f"{path}: not valid TOML: {e}", hint="see https://toml.io for the syntax") from None
    lines = text.splitlines()

    def fail(block, key, message, hint=None):
        raise FarmFileError(f"{path}:{_key_line(lines, block, key)}: {message}", hint=hint)

    for key in data:
        if key not in ("defaults", "device"):
            close = difflib.get_close_matches(key, ["defaults", "device"], n=1)
            fail(None, key, f"unknown top-level field {key!r}",
                 hint=f"did you mean {close[0]!r}?" if close else "a farm file has [defaults] and [[device]] tables")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        fail(None, "defaults", "[defaults] must be a table")
    _check_fields(defaults, ("defaults", 0), fail, path, where="[defaults]", allow_name=False)
    raw_devices = data.get("device", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        raise FarmFileError(f"{path}: no [[device]] entries", hint="add at least one [[device]] table with name and target")
    devices, names = [], set()
    for i, raw in enumerate(raw_devices):
        block = ("device", i)
        _check_fields(raw, block, fail, path, where=f"device #{i + 1}")
        merged = {**defaults, **raw}
        for req in ("name", "target"):
            if req not in merged:
                fail(block, "name", f"device #{i + 1} has no {req!r}")
        name = merged["name"]
        if name in names:
            fail(block, "name", f"device name {name!r} is used twice")
        names.add(name)
        devices.append(_make_device(merged, block, fail, path.parent, lines))
    return Farm(path=path, devices=devices)


def _check_fields(table: dict, block, fail, path: Path, where: str, allow_name: bool = True) -> None:
    """Reject unknown fields (with a suggestion), inline secrets, and values of the wrong type."""
    for key, value in table.items():
        if key.lower() in SECRET_FIELDS:
            fail(block, key, f"{where}: field {key!r} would put a secret in the farm file; secrets are not accepted",
                 hint="reference a key instead: identity_file = \"~/.ssh/id_ed25519_farm\" (load passphrase-"
                      "protected keys into ssh-agent), or ssh_alias = a Host of your ~/.ssh/config")
        if isinstance(value, str) and "PRIVATE KEY-----" in value:
            fail(block, key, f"{where}: field {key!r} holds an inline private key; secrets are not accepted",
                 hint="save the key in a file readable only by you and give its path as identity_file")
        if key not in FIELD_TYPES or (key == "name" and not allow_name):
            close = difflib.get_close_matches(key, list(FIELD_TYPES), n=1)
            fail(block, key, f"{where}: unknown field {key!r}",
                 hint=f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(FIELD_TYPES))}")
        _check_type(key, value, block, fail, where)


def _check_type(key, value, block, fail, where) -> None:
    bad = None
    if key in BOOL_FIELDS and not isinstance(value, bool):
        bad = "true or false"
    elif key in INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
        bad = "an integer"
    elif key in NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        bad = "a number (seconds)"
    elif key == "budgets" and not isinstance(value, dict):
        bad = "a table such as { decode_tok_s_min = 10 }"
    elif key == "providers" and not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
        bad = "a list of ONNX Runtime provider names"
    elif key not in BOOL_FIELDS | INT_FIELDS | NUMBER_FIELDS | {"budgets", "providers"} and not isinstance(value, str):
        bad = "a string"
    if bad:
        fail(block, key, f"{where}: {key} must be {bad} (got {value!r})")
    if key in POSITIVE and value <= 0:
        fail(block, key, f"{where}: {key} must be > 0 (got {value!r})")
    if key in ("port",) and not 0 < value < 65536:
        fail(block, key, f"{where}: port must be 1..65535 (got {value})")
    if key in ("retries", "warmup", "threads") and value < 0:
        fail(block, key, f"{where}: {key} must be >= 0 (got {value})")


def _make_device(merged: dict, block, fail, base: Path, lines: list[str]) -> Device:
    from targets import TARGETS, Budgets

    name = merged["name"]
    where = f"device {name!r}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        fail(block, "name", f"{where}: names may hold letters, digits, '.', '_', '-'")
    if merged["target"] not in TARGETS.names():
        close = difflib.get_close_matches(merged["target"], TARGETS.names(), n=1)
        fail(block, "target", f"{where}: unknown target {merged['target']!r}",
             hint=(f"did you mean {close[0]!r}? " if close else "") + f"targets: {', '.join(TARGETS.names())}")
    transport = merged.get("transport", "ssh")
    if transport not in TRANSPORTS:
        fail(block, "transport", f"{where}: transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})",
             hint="adb devices are measured with `slm-export android ...`, not the farm")
    if transport == "ssh" and bool(merged.get("host")) == bool(merged.get("ssh_alias")):
        fail(block, "host", f"{where}: an ssh device needs exactly one of host or ssh_alias")
    if transport == "emulated":
        from .emulate import BOARDS

        if merged.get("board") not in BOARDS:
            fail(block, "board" if "board" in merged else "transport",
                 f"{where}: an emulated device needs board = one of {', '.join(BOARDS)} (got {merged.get('board')!r})",
                 hint="build it first: slm-export device emulate pi5")
        if merged.get("python", "python3") not in ("python3", "python"):
            fail(block, "python", f"{where}: an emulated device runs the board's own aarch64 Python; remove python")
    for key in ("budgets",):
        unknown = set(merged.get(key, {})) - {f.name for f in dataclasses.fields(Budgets)}
        if unknown:
            k = sorted(unknown)[0]
            fail(block, k, f"{where}: unknown budget {k!r}",
                 hint=f"budgets: {', '.join(f.name for f in dataclasses.fields(Budgets))}")
    values = {k: v for k, v in merged.items() if k in FIELD_TYPES}
    for key in PATH_FIELDS & set(values):
        p = Path(values[key]).expanduser()
        p = p if p.is_absolute() else (base / p)
        if key != "known_hosts" and not p.exists():
            fail(block, key, f"{where}: {key} {str(p)!r} does not exist")
        if key == "identity_file" and p.suffix == ".pub":
            fail(block, key, f"{where}: identity_file must be the private key, not {p.name}")
        values[key] = str(p)
    from targets.transports import SAFE_PATH

    if '"' in values.get("known_hosts", "") or "\n" in values.get("known_hosts", ""):
        fail(block, "known_hosts", f"{where}: known_hosts {values['known_hosts']!r} holds a double quote or a line "
                                   "break, which ssh cannot read in an option",
             hint="move the file to a folder whose name has no '\"'")
    if not SAFE_PATH.match(values.get("workdir", "slm-export-farm")) or ".." in PurePosixPath(
            values.get("workdir", "x")).parts:
        fail(block, "workdir", f"{where}: workdir {values.get('workdir')!r} must be a plain path "
                               "(letters, digits, '.', '_', '-', '/'; not starting with '-')")
    return Device(line=_device_start(lines, block[1]), **values)


# ---------------------------------------------------------------- results


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
    bundle: str  # the bundle folder
    label: str  # "<format>/<recipe>"
    format: str
    recipe: str
    artifact_bytes: int
    checks: list[Check] = field(default_factory=list)
    result: dict | None = None  # the device runner's JSON


@dataclass
class DeviceReport:
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


# ---------------------------------------------------------------- running one device


@dataclass
class Bundle:
    """A bundle to deploy: its folder, manifest, runtime spec and the hashes the device must match."""

    path: Path
    manifest: dict
    spec: dict
    files: dict  # rel path (under the deployment folder) -> {"sha256", "bytes"}
    deploy_name: str

    @property
    def label(self) -> str:
        return f"{self.manifest['format']}/{self.manifest['recipe']}"


def load_bundle(path: str | Path, runtime_copy: Path) -> Bundle:
    """Read a bundle, refuse a damaged one, and list every file the device must receive intact."""
    from . import bundle as bundle_mod

    path = Path(path)
    if not (path / bundle_mod.MANIFEST).exists():
        raise SlmExportError(f"{path} is not a slm-export bundle (no {bundle_mod.MANIFEST})",
                             hint="build one with `slm-export --target TARGET --out DIR`")
    bad = bundle_mod.verify(path)
    if bad:
        raise SlmExportError(f"bundle {path} does not match its manifest.json: {'; '.join(bad[:3])}",
                             hint="export the bundle again")
    from .runtime.base import RunnerError, read_spec
    from .runtime.files import load_manifest, walk_plain_files

    manifest = load_manifest(path)  # verify() above refused symlinks, special and undeclared files
    try:
        spec = read_spec(path)
    except RunnerError as e:
        raise SlmExportError(f"bundle {path}: {e}") from None
    files = {}
    for root, prefix in ((path, "bundle"), (runtime_copy, RUNTIME_PACKAGE)):
        for rel in walk_plain_files(root):
            # verify() has just hashed the manifest's files: only the rest (manifest, reports, runtime) here.
            entry = manifest["files"].get(rel) if root is path else None
            p = root / rel
            files[f"{prefix}/{rel}"] = entry or {"sha256": sha256(p), "bytes": p.stat().st_size}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "bundle"
    return Bundle(path=path, manifest=manifest, spec=spec, files=files, deploy_name=f"{safe}-{digest}")


def runtime_copy(dest: Path) -> Path:
    """A clean copy of the device-side runtime package (no caches) to deploy as ``slm_runtime``."""
    out = dest / RUNTIME_PACKAGE
    shutil.copytree(RUNTIME_DIR, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def make_transport(device: Device):
    """The transport object for ``device``."""
    from targets.transports import LocalTransport, SshOptions, SshTransport

    if device.transport == "local":
        return LocalTransport(label=f"{device.name} (this machine)")
    if device.transport == "emulated":
        from .emulate import transport

        return transport(device.board)
    opts = SshOptions(host=device.host or device.ssh_alias, port=device.port, user=device.user,
                      identity_file=device.identity_file, known_hosts=device.known_hosts,
                      first_contact=device.first_contact, ssh_config=device.ssh_config,
                      connect_timeout_s=device.connect_timeout_s, retries=device.retries)
    return SshTransport(opts)


def target_profile(target: str):
    """The target's module (``targets/<name>.py``): may declare ORT_PROVIDERS, TRTEXEC, ... for the farm."""
    try:
        return importlib.import_module(f"targets.{target}")
    except ModuleNotFoundError:
        return None


def _device_script() -> str:
    return DEVICE_SCRIPT.read_text()


def _is_interrupt(e: Exception) -> bool:
    return getattr(e, "kind", None) == "interrupted"


def _json_result(res, what: str) -> dict:
    line = res.last_json_line()
    if line is None:
        tail = [ln for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
        raise DeviceError(f"{what} printed no result (exit {res.returncode}): {tail[-1][:300] if tail else 'no output'}")
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise DeviceError(f"{what} printed unreadable output: {line[:200]}") from None


class DeviceRun:
    """Everything the farm does with one device, recorded as checks."""

    def __init__(self, device: Device, bundles: list[Bundle], progress: Callable[[str], None]):
        from targets import get_target

        self.device = device
        self.bundles = bundles
        self.progress = lambda m: progress(f"{device.name}: {m}")
        self.target = get_target(device.target)
        self.profile = target_profile(device.target)
        self.transport = make_transport(device)
        self.report = DeviceReport(device.name, device.target, device.transport, self.transport.label)
        self.script = _device_script()

    def python(self, *args) -> list[str]:
        """argv running the device script with the device's Python."""
        # --exit-on-stdin-eof: the command ends when its ssh client (or this process) goes away.
        return [self.device.python, "-c", self.script, "--exit-on-stdin-eof", *map(str, args)]

    # ------------------------------------------------------------ steps

    def execute(self) -> DeviceReport:
        t0 = time.perf_counter()
        try:
            if self._connect():
                for b in self.bundles:
                    if CANCELLED.is_set():
                        self._interrupted(f"before {b.label}")
                    if self.report.status in ("down", "interrupted"):
                        break
                    self.report.runs.append(self._run_bundle(b))
        except DeviceError as e:
            self._down_or_fail(e)
        self.report.seconds = time.perf_counter() - t0
        if self.report.status not in ("down", "interrupted"):
            failed = [f"{p + ': ' if p else ''}{c.name}" for p, c in self.report.all_checks()
                      if c.status in ("failed", "error")]
            if failed:
                self.report.status, self.report.reason = "failed", "failed checks: " + ", ".join(failed)
            elif getattr(self.transport, "emulated", False):
                from .emulate import EMULATED_NOTE

                self.report.reason = EMULATED_NOTE  # the row must not be read as the board's speed
        return self.report

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

    def _connect(self) -> bool:
        d = self.device
        t0 = time.perf_counter()
        self.progress(f"probe {self.transport.label}")
        fmt = self.bundles[0].manifest["format"] if self.bundles else "onnx"
        trtexec = list(getattr(self.profile, "TRTEXEC", ())) if d.trtexec else []
        argv = self.python("probe", fmt, *[x for c in trtexec for x in ("--trtexec", c)])
        try:
            res = self.transport.run(argv, d.probe_timeout_s, what="the device probe")
        except DeviceError as e:  # unreachable, untrusted, refused, or silent past the probe timeout
            interrupted = _is_interrupt(e)
            self.report.status, self.report.reason = ("interrupted", "interrupted (Ctrl-C) during the probe") \
                if interrupted else ("down", str(e))
            self.report.checks.append(Check("connect", "interrupted" if interrupted else "error", str(e),
                                            time.perf_counter() - t0))
            return False
        secs = time.perf_counter() - t0
        if res.returncode == 127 or (res.returncode != 0 and "No such file" in res.stderr):
            self.report.checks.append(Check("connect", "passed", f"reached {self.transport.label}", secs))
            self.report.checks.append(Check(
                "python", "failed",
                f"python {d.python!r} is not found on {self.transport.label}; set python = \"/path/to/python3\" "
                f"for device {d.name!r} (line {d.line} of the farm file)"))
            return False
        try:
            probe = _json_result(res, "the device probe")
        except DeviceError as e:
            self.report.checks.append(Check("connect", "passed", f"reached {self.transport.label}", secs))
            self.report.checks.append(Check("python", "failed", f"{d.python}: {e.message}"))
            return False
        self.report.probe = probe
        self.report.checks.append(Check("connect", "passed", f"reached {self.transport.label} "
                                        f"({probe.get('hostname')}, {probe.get('machine')})", secs, probe))
        problems = []
        if not probe.get("python_ok"):
            problems.append(f"Python {probe.get('python')} is too old (3.9 or newer needed)")
        if not probe.get("numpy"):
            problems.append(f"numpy cannot be imported ({probe.get('numpy_error')}): pip install numpy")
        self.report.checks.append(Check("python", "failed" if problems else "passed",
                                        "; ".join(problems) or f"Python {probe['python']}, numpy {probe['numpy']}"))
        return not problems

    def _run_bundle(self, b: Bundle) -> BundleRun:
        run = BundleRun(str(b.path), b.label, b.manifest["format"], b.manifest["recipe"],
                        int(b.manifest.get("artifact", {}).get("bytes", 0)))
        if b.manifest["format"] not in self.target.formats:
            run.checks.append(Check("format", "skipped", f"target {self.target.name} does not run "
                                    f"{b.manifest['format']} (formats: {', '.join(self.target.formats)})"))
            return run
        if not self._runtime_check(b, run):
            return run
        try:
            dest = self._deploy(b, run)
            self._run(b, run, dest)
        except DeviceError as e:
            step = "run" if any(c.name == "deploy" for c in run.checks) else "deploy"
            if _is_interrupt(e):
                self._interrupted(f"during {step} of {b.label}")
                run.checks.append(Check(step, "interrupted", str(e)))
                return run
            if getattr(e, "device_down", False):  # the device went away mid-way: down, with what it got to
                self.report.status, self.report.reason = "down", f"lost during {step} of {b.label}: {e}"
            run.checks.append(Check(step, "error", str(e)))
            return run
        if run.result:
            self._parity(b, run)
            self._budget(run)
            self._providers(run)
            self._trtexec(b, run, dest)
        return run

    def _runtime_check(self, b: Bundle, run: BundleRun) -> bool:
        probe = self.report.probe
        fmt = b.manifest["format"]
        if fmt == "pte" and getattr(self.transport, "emulated", False):
            from .emulate import PTE_NOTE

            run.checks.append(Check("runtime", "skipped", PTE_NOTE))
            return False
        if probe.get("runtime") and fmt == self.bundles[0].manifest["format"]:
            run.checks.append(Check("runtime", "passed", f"{probe['runtime']} {probe['runtime_version']}"))
            return True
        if fmt != self.bundles[0].manifest["format"]:  # the probe looked at another format: probe again
            res = self.transport.run(self.python("probe", fmt), self.device.probe_timeout_s, what="the device probe")
            probe = _json_result(res, "the device probe")
            if probe.get("runtime"):
                run.checks.append(Check("runtime", "passed", f"{probe['runtime']} {probe['runtime_version']}"))
                return True
        errors = probe.get("runtime_errors", {})
        pip = " or ".join(errors) or fmt
        hint = getattr(self.profile, "RUNTIME_PIP_HINT", None) if fmt == "onnx" else None
        run.checks.append(Check(
            "runtime", "failed",
            f"this {fmt} bundle needs {pip} on the device, but {self.device.python} cannot import it "
            f"({'; '.join(str(v) for v in errors.values())[:300]}): {hint or 'pip install ' + list(errors or [fmt])[0]}"))
        return False

    def _deploy(self, b: Bundle, run: BundleRun) -> str:
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

        def verify(partial: str) -> None:
            v = self.transport.run(self.python("verify", partial, expected), d.copy_timeout_s,
                                   what="verifying the copy")
            out = _json_result(v, "verifying the copy")
            if not out.get("ok"):
                bad = ", ".join(f"{x['file']} ({x['problem']})" for x in out.get("bad", [])[:5])
                raise DeviceError(f"files arrived damaged: {bad}")

        with tempfile.TemporaryDirectory(prefix="slm-farm-") as tmp:
            rt = runtime_copy(Path(tmp))
            self.transport.deploy({"bundle": b.path, RUNTIME_PACKAGE: rt}, dest, verify=verify,
                                  timeout=d.copy_timeout_s)
        run.checks.append(Check("deploy", "passed", f"{len(b.files)} files copied to {dest} and verified",
                                time.perf_counter() - t0, {"dest": dest, "copied": True}))
        return dest

    def _providers_for(self, b: Bundle, dest: str) -> tuple[list[str], dict]:
        if b.manifest["format"] != "onnx":
            return [], {}
        providers = self.device.providers or list(getattr(self.profile, "ORT_PROVIDERS", ()) or [])
        options = {}
        if providers and hasattr(self.profile, "provider_options"):
            options = self.profile.provider_options(b.spec, f"{dest}/{getattr(self.profile, 'TRT_CACHE_DIR', 'trt_cache')}")
        return providers, options

    def _run(self, b: Bundle, run: BundleRun, dest: str) -> None:
        d = self.device
        providers, options = self._providers_for(b, dest)
        argv = self.python("run", "--support", dest, "--deadline", f"{d.timeout_s:g}",
                           f"{dest}/bundle", "--decode-tokens", d.decode_tokens, "--repeats", d.repeats,
                           "--warmup", d.warmup, "--parity")
        if d.threads:
            argv += ["--threads", str(d.threads)]
        if providers:
            argv += ["--providers", ",".join(providers), "--provider-options", json.dumps(options)]
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

    def _parity(self, b: Bundle, run: BundleRun) -> None:
        from .recipes import get_recipe

        metrics = run.result.get("parity")
        if not metrics:
            run.checks.append(Check("parity", "skipped", "the bundle ships no parity_reference.npz"))
            return
        failures = get_recipe(b.manifest["recipe"]).thresholds.failures(metrics)
        host = (b.manifest.get("parity") or {}).get("metrics", {})
        summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("max_abs_err", "top1_agreement", "cosine_min")
                            if isinstance(metrics.get(k), (int, float)))
        run.checks.append(Check("parity", "failed" if failures else "passed",
                                ("; ".join(failures) + f" ({summary})") if failures else summary,
                                data={"device": metrics, "host": {k: host.get(k) for k in metrics if k in host}}))

    def _budget(self, run: BundleRun) -> None:
        budgets = dataclasses.replace(self.target.budgets, **self.device.budgets)
        lat = run.result["latency"]
        if getattr(self.transport, "emulated", False):
            from .emulate import EMULATED_NOTE

            run.checks.append(Check("budget", "skipped", f"{EMULATED_NOTE} (QEMU translates every instruction)"))
            return
        if "decode_tok_s" not in lat:
            run.checks.append(Check("budget", "skipped", "budgets apply to causal LMs (decode tok/s, TTFT)"))
            return
        set_budgets = {k: v for k, v in dataclasses.asdict(budgets).items() if v is not None}
        if not set_budgets:
            run.checks.append(Check("budget", "skipped", f"target {self.target.name} sets no budgets"))
            return
        failures = budgets.failures(lat)
        figures = (f"decode {lat['decode_tok_s']:.1f} tok/s, TTFT {lat['ttft_ms']:.1f} ms, "
                   f"peak RSS {lat.get('peak_rss_mb', 0):.0f} MB")
        run.checks.append(Check("budget", "failed" if failures else "passed",
                                (f"missed the {self.target.name} budget: " + "; ".join(failures)) if failures
                                else f"within the {self.target.name} budget ({figures})",
                                data={"budgets": set_budgets, "figures": figures}))

    def _providers(self, run: BundleRun) -> None:
        info = run.result.get("ort_providers")
        required = list(getattr(self.profile, "REQUIRED_PROVIDERS", ()))
        if not info:
            return
        used = sorted({p for session in info["used"] for p in session})
        missing = [p for p in required if p not in used]
        if missing:
            hint = getattr(self.profile, "RUNTIME_PIP_HINT", "")
            run.checks.append(Check("providers", "failed",
                                    f"onnxruntime ran on {', '.join(used)}, not {', '.join(missing)} "
                                    f"(available: {', '.join(info['available'])}); {hint}", data=info))
        else:
            run.checks.append(Check("providers", "passed", f"sessions used {', '.join(used)}", data=info))

    def _trtexec(self, b: Bundle, run: BundleRun, dest: str) -> None:
        if not hasattr(self.profile, "trtexec_argv") or b.manifest["format"] != "onnx" or not self.device.trtexec:
            return
        tool = self.report.probe.get("trtexec")
        if not tool:
            run.checks.append(Check("trtexec", "skipped", "trtexec is not installed on the device "
                                    "(JetPack: apt-get install tensorrt, /usr/src/tensorrt/bin/trtexec)"))
            return
        argv = self.profile.trtexec_argv(tool, f"{dest}/bundle/{b.spec['artifact']}", b.spec,
                                         len(b.spec.get("latency_prompt_ids") or [64]))
        t0 = time.perf_counter()
        res = self.transport.run(argv, self.device.timeout_s, what="trtexec")
        figures = self.profile.parse_trtexec(res.stdout + res.stderr)
        ok = res.returncode == 0 and figures
        tail = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()][-1:] or ["no output"]
        run.checks.append(Check("trtexec", "passed" if ok else "failed",
                                (f"decode step {figures.get('gpu_compute_ms', {}).get('median', float('nan')):.3f} ms "
                                 "(GPU compute median)") if ok else f"trtexec failed: {tail[0][:300]}",
                                time.perf_counter() - t0, figures))


# ---------------------------------------------------------------- the whole farm


def run_farm(farm: Farm, bundle_dirs: list[str | Path], only: list[str] | None = None,
             progress: Callable[[str], None] = lambda m: None, max_workers: int = 8) -> list[DeviceReport]:
    """Deploy and check every bundle on every device of ``farm`` (devices in parallel)."""
    devices = [d for d in farm.devices if not only or d.name in only]
    if only and len(devices) != len(set(only)):
        unknown = sorted(set(only) - {d.name for d in farm.devices})
        raise SlmExportError(f"no device called {', '.join(unknown)} in {farm.path}",
                             hint=f"devices: {', '.join(d.name for d in farm.devices)}")
    if not bundle_dirs:
        raise SlmExportError("no bundle given", hint="pass --bundle DIR (a folder written by slm-export)")
    with tempfile.TemporaryDirectory(prefix="slm-farm-rt-") as tmp:
        rt = runtime_copy(Path(tmp))
        bundles = [load_bundle(p, rt) for p in bundle_dirs]

    def one(device: Device) -> DeviceReport:
        if CANCELLED.is_set():
            return _not_finished(device)
        try:
            return DeviceRun(device, bundles, progress).execute()
        except DeviceError as e:  # e.g. no ssh client: this device is down, the others go on
            return DeviceReport(device.name, device.target, device.transport, device.host or device.name,
                                status="down", reason=str(e), checks=[Check("connect", "error", str(e))])
        except Exception as e:  # noqa: BLE001 - one device's bug must not hide the others' results
            return DeviceReport(device.name, device.target, device.transport, device.host or device.name,
                                status="failed", reason=f"internal error: {type(e).__name__}: {e}",
                                checks=[Check("farm", "error", f"{type(e).__name__}: {e}")])

    from targets.transports import reset_cancel

    reset_cancel()
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(devices))))
    futures = [pool.submit(one, d) for d in devices]
    try:
        _wait_all(futures)
    except KeyboardInterrupt:
        raise FarmInterrupted(_stop(pool, futures, devices)) from None
    pool.shutdown()
    return [f.result() for f in futures]


class FarmInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during ``run_farm``; ``reports`` holds every device, finished or not."""

    def __init__(self, reports: list[DeviceReport]):
        super().__init__("interrupted")
        self.reports = reports

    @property
    def finished(self) -> int:
        return sum(r.status != "interrupted" for r in self.reports)


# After Ctrl-C, how long the device threads get to notice, remove partial folders and record results.
STOP_GRACE_S = 15.0


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
    return DeviceReport(device.name, device.target, device.transport, device.host or device.name,
                        status="interrupted", reason=msg, checks=[Check("farm", "interrupted", msg)])


# ---------------------------------------------------------------- reports


def to_json(reports: list[DeviceReport], farm: Farm | None = None) -> dict:
    """The JSON report: every device, check and runner result."""
    return {
        "schema": "slm-export/farm/1",
        "farm": str(farm.path) if farm else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": {s: sum(r.status == s for r in reports) for s in ("passed", "failed", "down", "interrupted")},
        "devices": [dataclasses.asdict(r) for r in reports],
    }


def junit_xml(reports: list[DeviceReport]) -> str:
    """JUnit XML: one testsuite per device, one testcase per check; a down device is an error, and so is
    a check cut short by Ctrl-C (type "interrupted")."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="slm-export farm")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in reports:
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
            totals[k] += v
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _plots(reports: list[DeviceReport]) -> dict[str, str]:
    """Base64 PNGs: per-token latency per device and format; artifact size vs parity error."""
    from .report import _figure_png

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    series = [(f"{r.name}\n{run.label}", run.result["latency"].get("per_token_ms_samples") or [])
              for r in reports for run in r.runs if run.result]
    series = [(k, v) for k, v in series if v]
    if series:
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(series)), 3.5))
        ax.boxplot([v for _, v in series], showfliers=True)
        ax.set_xticks(range(1, len(series) + 1), [k for k, _ in series], fontsize=8)
        ax.set_yscale("log")  # tails (page faults, other load) span decades; a log axis keeps the boxes readable
        ax.set_ylabel("per-token decode latency (ms, log)")
        ax.set_title("decode latency by device and format")
        out["latency"] = _figure_png(fig)
        plt.close(fig)
    points = [(r.name, run.label, run.artifact_bytes / 1e6, run.result["parity"].get("max_abs_err"))
              for r in reports for run in r.runs if run.result and run.result.get("parity")]
    points = [p for p in points if p[3] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
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
        out["size_parity"] = _figure_png(fig)
        plt.close(fig)
    return out


def _runtime_cell(run: BundleRun) -> str:
    return f"{run.label} on {run.result.get('runtime')} {run.result.get('runtime_version')}"


def html_report(reports: list[DeviceReport], farm: Farm | None = None) -> str:
    """One HTML page: summary per device, each check, and the two plots.

    Every value from a device (probe, runner output), a bundle or the farm file is escaped: a
    bundle is untrusted input, and a hostname such as ``<script>`` must stay text.
    """
    import html

    def esc(value) -> str:
        return html.escape(str(value), quote=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>slm-export farm</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;vertical-align:top}.failed,.error,.down{color:#b00}"
             ".passed{color:#070}.skipped{color:#777}.interrupted{color:#a60}</style>",
             f"<h1>Device farm{': ' + esc(farm.path) if farm else ''}</h1>",
             "<table><tr><th>device<th>target<th>reached as<th>status<th>runtime<th>decode tok/s<th>TTFT ms"
             "<th>peak RSS MB<th>max |logit err|<th>top-1<th>reason"]
    for r in reports:
        runs = [run for run in r.runs if run.result] or [None]
        for run in runs:
            lat = run.result["latency"] if run else {}
            par = (run.result.get("parity") or {}) if run else {}

            def num(v, f):
                return f.format(v) if isinstance(v, (int, float)) else ""
            parts.append(
                f"<tr><td>{esc(r.name)}<td>{esc(r.target)}<td>{esc(r.label)}<td class='{esc(r.status)}'>{esc(r.status)}"
                f"<td>{esc(_runtime_cell(run)) if run else ''}"
                f"<td>{num(lat.get('decode_tok_s'), '{:.1f}')}<td>{num(lat.get('ttft_ms'), '{:.1f}')}"
                f"<td>{num(lat.get('peak_rss_mb'), '{:.0f}')}<td>{num(par.get('max_abs_err'), '{:.3g}')}"
                f"<td>{num(par.get('top1_agreement'), '{:.3f}')}<td>{esc(r.reason)}")
    parts.append("</table>")
    plots = _plots(reports)
    for key, alt in (("latency", "per-token latency by device and format"), ("size_parity", "size vs parity error")):
        if key in plots:
            parts.append(f"<h2>{alt}</h2><img alt='{alt}' src='data:image/png;base64,{plots[key]}'>")
    for r in reports:
        parts.append(f"<h2>{esc(r.name)} <span class='{esc(r.status)}'>{esc(r.status)}</span></h2>")
        dev = r.probe
        if dev:
            parts.append(f"<p>{esc(dev.get('hostname'))}: {esc(dev.get('machine'))}, {esc(dev.get('os'))}, "
                         f"Python {esc(dev.get('python'))}, {esc(dev.get('cpu_count'))} CPUs</p>")
        parts.append("<table><tr><th>bundle<th>check<th>status<th>seconds<th>message")
        for prefix, c in r.all_checks():
            parts.append(f"<tr><td>{esc(prefix)}<td>{esc(c.name)}<td class='{esc(c.status)}'>{esc(c.status)}"
                         f"<td>{c.seconds:.2f}<td>{esc(c.message)}")
        parts.append("</table>")
    return "\n".join(parts)


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
        path = Path(path)
        try:
            if path.is_dir():
                raise IsADirectoryError(21, "is a folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                with open(path, "a"):
                    pass
            else:
                with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
                    pass
        except OSError as e:
            problems.append(f"{option} {path}: {e.strerror or e}")
    if problems:
        raise SlmExportError("cannot write the report" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
                             hint="choose a path in a folder you can write; no device was contacted")


def write_reports(reports: list[DeviceReport], farm: Farm | None = None, junit: Path | None = None,
                  json_path: Path | None = None, html_path: Path | None = None) -> None:
    """Write whichever reports were asked for (parent folders are created)."""
    for path, make in ((junit, lambda: junit_xml(reports)), (json_path, lambda: json.dumps(to_json(reports, farm), indent=2, default=str)),
                       (html_path, lambda: html_report(reports, farm))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(make())
