"""The adb transport: reach an Android device, push a bundle atomically, run an ExecuTorch runner.

Every adb call is an argument list with a timeout. ``adb shell`` joins its arguments with spaces
and hands the result to the device's ``sh``, so each remote argument is quoted with
``shlex.quote`` first: a prompt or path with spaces or quotes arrives as one argument.

A bundle is pushed into a temporary directory next to its destination and moved into place only
after every file arrived with the right size; a push cut short (device unplugged, timeout) leaves
at most that temporary directory, which is removed when the device is still reachable, and the
destination is never claimed as deployed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from exporter.errors import DeviceError, SlmExportError

DEBIAN_PACKAGE = "adb"
DEVICE_ROOT = "/data/local/tmp/slm-export"  # writable by the shell user on every Android device
OBSERVER_PREFIX = "PyTorchObserver "  # ExecuTorch LLM runner stats line (extension/llm/runner/stats.h)

# Timeouts in seconds; a disconnected device makes adb hang, so nothing waits without one.
T_QUICK = 20
T_PUSH = 600
T_RUN = 900


@dataclass
class AdbDevice:
    """One line of ``adb devices -l``."""

    serial: str
    state: str  # device | unauthorized | offline | recovery | ...
    info: dict = field(default_factory=dict)  # model:, product:, device:, transport_id:

    @property
    def ready(self) -> bool:
        return self.state == "device"


def find_adb(adb_path: str | None = None) -> str:
    """The adb executable (``adb_path`` or the one on PATH); absent -> DeviceError."""
    found = shutil.which(adb_path or "adb")
    if not found:
        raise DeviceError(
            "adb is not installed (not found on PATH)" if not adb_path else f"adb not found at {adb_path}",
            hint=f"install the Debian package `{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}) "
            "or Android platform-tools, and put adb on PATH",
        )
    return found


def parse_devices(output: str) -> list[AdbDevice]:
    """Parse ``adb devices -l`` output into devices (header and daemon messages skipped)."""
    devices = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("*") or line.startswith("List of devices"):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        info = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        devices.append(AdbDevice(serial=parts[0], state=parts[1], info=info))
    return devices


def check_runner_binary(path: str | os.PathLike) -> Path:
    """Validate ``--runner PATH``: an existing, executable file (an ExecuTorch runner such as llama_main)."""
    p = Path(path).expanduser()
    hint = ("build ExecuTorch's llama_main for arm64-v8a (examples/models/llama, Android NDK) "
            "and pass its path with --runner")
    if not p.exists():
        raise SlmExportError(f"--runner {p}: no such file", hint=hint)
    if not p.is_file():
        raise SlmExportError(f"--runner {p} is not a file", hint=hint)
    if not os.access(p, os.X_OK):
        raise SlmExportError(f"--runner {p} is not executable", hint=f"chmod +x {shlex.quote(str(p))}")
    return p


class Adb:
    """An adb client bound to one device (``serial``, or the only one attached)."""

    def __init__(self, serial: str | None = None, adb_path: str | None = None):
        self.adb = find_adb(adb_path)
        self.serial = serial

    # ------------------------------------------------------------ plumbing

    def _cmd(self, args: list[str]) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else []), *args]

    def run(self, args: list[str], timeout: float = T_QUICK, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``adb [-s SERIAL] ARGS`` (a list) with a timeout; failures become DeviceError."""
        cmd = self._cmd(args)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"`adb {' '.join(args[:2])}` timed out after {timeout:g} s",
                hint="the device stopped answering (unplugged, asleep, or USB debugging revoked); "
                "reconnect it and check `adb devices`",
            ) from None
        except OSError as e:
            raise DeviceError(f"cannot run {self.adb}: {e.strerror}") from None
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise DeviceError(f"`adb {' '.join(args[:2])}` failed: {detail[-1][:300] if detail else proc.returncode}")
        return proc

    def shell(self, argv: list[str], timeout: float = T_QUICK, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on the device; each argument is quoted for the device's shell."""
        return self.run(["shell", *[shlex.quote(str(a)) for a in argv]], timeout=timeout, check=check)

    # ------------------------------------------------------------ devices

    def devices(self) -> list[AdbDevice]:
        """Every device adb sees (``adb devices -l``), whatever its state."""
        proc = subprocess_run_devices(self.adb)
        return parse_devices(proc)

    def select(self) -> AdbDevice:
        """The device to use: ``serial`` if given, else the only ready one; clear errors otherwise."""
        devices = self.devices()
        if not devices:
            raise DeviceError("no Android device attached (adb devices lists none)",
                              hint="connect a phone with USB debugging enabled and accept the RSA prompt")
        if self.serial:
            match = [d for d in devices if d.serial == self.serial]
            if not match:
                raise DeviceError(f"device {self.serial} is not attached",
                                  hint=f"attached: {', '.join(d.serial for d in devices)}")
            device = match[0]
        else:
            ready = [d for d in devices if d.ready]
            if len(ready) > 1:
                raise DeviceError(f"{len(ready)} Android devices attached; say which one",
                                  hint=f"pass --serial, one of: {', '.join(d.serial for d in ready)}")
            device = ready[0] if ready else devices[0]
        if not device.ready:
            raise DeviceError(f"device {device.serial} is {device.state}",
                              hint="unlock it and accept the USB debugging prompt" if device.state == "unauthorized"
                              else "reconnect it and check `adb devices`")
        self.serial = device.serial
        return device

    def properties(self) -> dict:
        """Model, ABI, Android release and SoC of the selected device."""
        out = {}
        for key in ("ro.product.model", "ro.product.cpu.abi", "ro.build.version.release", "ro.soc.model"):
            proc = self.shell(["getprop", key], check=False)
            out[key] = proc.stdout.strip()
        return out

    # ------------------------------------------------------------ files

    def push_bundle(self, local_dir: Path, remote_dir: str, timeout: float = T_PUSH) -> str:
        """Push ``local_dir`` to ``remote_dir`` atomically; returns ``remote_dir`` once it is complete."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if not files:
            raise SlmExportError(f"{local_dir} holds no files to push")
        remote = PurePosixPath(remote_dir)
        staging = str(remote.parent / f".{remote.name}.partial-{uuid.uuid4().hex[:8]}")
        self.shell(["mkdir", "-p", str(remote.parent)])
        try:
            # "adb push DIR DEST" with DEST absent creates DEST holding DIR's contents; the
            # staging name is unique, so DEST is always absent here.
            self.run(["push", str(local_dir), staging], timeout=timeout)
            self._verify_sizes(local_dir, files, staging)
            old = f"{staging}.old"
            # Move the previous bundle aside, the new one in, then drop the old one: at no point
            # does remote_dir hold a mix of two bundles or a partial one.
            self.shell(["sh", "-c", 'if [ -e "$1" ]; then mv "$1" "$2"; fi; mv "$3" "$1" && rm -rf "$2"',
                        "mv-bundle", str(remote), old, staging])
        except DeviceError as e:
            self._discard(staging)
            raise DeviceError(f"pushing the bundle failed; nothing was deployed to {remote}: {e.message}",
                              hint=e.hint) from None
        return str(remote)

    def _verify_sizes(self, local_dir: Path, files: list[Path], staging: str) -> None:
        rel = [str(PurePosixPath(*p.relative_to(local_dir).parts)) for p in files]
        # toybox/busybox `wc -c` prints "SIZE PATH" per file; the remote paths are quoted by shell().
        proc = self.shell(["sh", "-c", 'cd "$1" && shift && wc -c "$@"', "sizes", staging, *rel], check=False)
        sizes = {}
        for line in proc.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].isdigit():
                sizes[parts[1].strip()] = int(parts[0])
        for p, r in zip(files, rel):
            if sizes.get(r) != p.stat().st_size:
                raise DeviceError(f"{r} arrived with {sizes.get(r)} bytes, expected {p.stat().st_size}")

    def _discard(self, staging: str) -> None:
        try:
            self.shell(["rm", "-rf", staging], timeout=T_QUICK, check=False)
        except DeviceError:
            pass  # the device is gone; the staging directory is never read as a bundle

    def push_runner(self, runner: Path, remote_path: str, timeout: float = T_PUSH) -> str:
        """Push the runner binary and mark it executable."""
        self.shell(["mkdir", "-p", str(PurePosixPath(remote_path).parent)])
        self.run(["push", str(runner), remote_path], timeout=timeout)
        self.shell(["chmod", "755", remote_path])
        return remote_path

    # ------------------------------------------------------------ running

    def run_llm_runner(self, runner_remote: str, model: str, tokenizer: str, prompt: str,
                       seq_len: int, threads: int | None = None, timeout: float = T_RUN,
                       extra_args: list[str] | None = None) -> dict:
        """Run an ExecuTorch LLM runner (llama_main flags) once; return its parsed stats."""
        argv = [runner_remote, f"--model_path={model}", f"--tokenizer_path={tokenizer}",
                f"--prompt={prompt}", f"--seq_len={int(seq_len)}", "--temperature=0"]
        if threads:
            argv.append(f"--cpu_threads={int(threads)}")
        argv += list(extra_args or [])
        proc = self.shell(argv, timeout=timeout, check=False)
        output = proc.stdout + "\n" + proc.stderr
        stats = parse_observer_stats(output)
        if proc.returncode != 0 or not stats:
            tail = [ln for ln in output.strip().splitlines() if ln.strip()][-3:]
            raise DeviceError(
                f"the runner {'exited with code ' + str(proc.returncode) if proc.returncode else 'printed no PyTorchObserver stats'}",
                hint="last output: " + " | ".join(tail)[:400] if tail else "the runner printed nothing",
            )
        return stats[-1]


def subprocess_run_devices(adb: str) -> str:
    """``adb devices -l`` output (its own function: it must not carry a serial)."""
    try:
        proc = subprocess.run([adb, "devices", "-l"], capture_output=True, text=True, timeout=T_QUICK)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"`adb devices` timed out after {T_QUICK} s",
                          hint="restart the adb server: adb kill-server") from None
    except OSError as e:
        raise DeviceError(f"cannot run {adb}: {e.strerror}") from None
    if proc.returncode != 0:
        raise DeviceError(f"`adb devices` failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc.stdout


# ---------------------------------------------------------------- runner output


def parse_observer_stats(output: str) -> list[dict]:
    """Every ``PyTorchObserver {json}`` line ExecuTorch's LLM runner printed, decoded."""
    out = []
    for line in output.splitlines():
        idx = line.find(OBSERVER_PREFIX)
        if idx < 0:
            continue
        m = re.search(r"\{.*\}", line[idx + len(OBSERVER_PREFIX):])
        if not m:
            continue
        try:
            out.append(json.loads(m.group(0)))
        except json.JSONDecodeError:
            continue
    return out


def stats_to_latency(runs: list[dict]) -> dict:
    """Turn runner stats (one dict per run) into the keys of ``exporter.runtime.base.measure_latency``.

    The runner reports stage timestamps, not per-token times: ``per_token_ms`` percentiles are over
    the per-run mean decode step time (one sample per run), which is what the stats allow.
    """
    import statistics

    if not runs:
        raise ValueError("no runner stats to summarize")
    ttft, prefill, decode, step_ms, load = [], [], [], [], []
    for s in runs:
        unit = float(s.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)) / 1000.0  # units per ms
        start, pe_end = s["inference_start_ms"], s["prompt_eval_end_ms"]
        end, first = s["inference_end_ms"], s["first_token_ms"]
        prefill_ms = max(pe_end - start, 1e-9) / unit
        decode_ms = max(end - pe_end, 1e-9) / unit
        gen = int(s["generated_tokens"])
        ttft.append((first - start) / unit)
        prefill.append(int(s["prompt_tokens"]) / (prefill_ms / 1000))
        decode.append(gen / (decode_ms / 1000) if gen else 0.0)
        step_ms.append(decode_ms / gen if gen else float("nan"))
        load.append((s["model_load_end_ms"] - s["model_load_start_ms"]) / unit / 1000)

    def pct(values, q):
        values = sorted(v for v in values if v == v)
        if not values:
            return float("nan")
        k = (len(values) - 1) * q / 100
        lo, hi = int(k), min(int(k) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (k - lo)

    return {
        "prompt_tokens": int(runs[-1]["prompt_tokens"]),
        "decode_tokens": int(runs[-1]["generated_tokens"]),
        "repeats": len(runs),
        "warmup": 0,
        "ttft_ms": statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "decode_tok_s_spread": [min(decode), max(decode)],
        "per_token_ms": {"p50": pct(step_ms, 50), "p90": pct(step_ms, 90), "p99": pct(step_ms, 99)},
        "per_token_ms_samples": [round(x, 4) for x in step_ms],
        "load_s": statistics.median(load),
        "source": "executorch runner PyTorchObserver stats",
    }


# ---------------------------------------------------------------- the whole on-device measurement


def measure_on_device(bundle_dir: Path, runner: str | os.PathLike, serial: str | None = None,
                      prompt: str = "Tell me a short story about a robot.", seq_len: int = 128,
                      repeats: int = 3, threads: int | None = None, device_root: str = DEVICE_ROOT,
                      adb_path: str | None = None, run_timeout: float = T_RUN, push_timeout: float = T_PUSH,
                      name: str | None = None) -> dict:
    """Push ``bundle_dir`` and the ``runner`` binary, run it ``repeats`` times, return latency figures.

    The bundle must hold ``runtime.json`` naming the ``.pte`` and a ``tokenizer.json``. The first
    run is a warm-up (page cache, CPU governor) and is not counted. ``name`` is the folder name on
    the device (default: the bundle folder's).
    """
    bundle_dir = Path(bundle_dir)
    runner_path = check_runner_binary(runner)
    spec_path = bundle_dir / "runtime.json"
    if not spec_path.exists():
        raise SlmExportError(f"{bundle_dir} has no runtime.json: not a slm-export bundle")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != "pte":
        raise SlmExportError(f"the adb runner runs .pte bundles; this bundle is {spec.get('format')!r}",
                             hint="export with --format pte for an on-device run over adb")
    if not (bundle_dir / "tokenizer.json").exists():
        raise SlmExportError(f"{bundle_dir} has no tokenizer.json for the runner")
    adb = Adb(serial=serial, adb_path=adb_path)
    device = adb.select()
    props = adb.properties()
    remote = adb.push_bundle(bundle_dir, f"{device_root}/{name or bundle_dir.name}", timeout=push_timeout)
    runner_remote = adb.push_runner(runner_path, f"{device_root}/bin/{runner_path.name}", timeout=push_timeout)
    runs = []
    for i in range(repeats + 1):
        stats = adb.run_llm_runner(runner_remote, f"{remote}/{spec['artifact']}", f"{remote}/tokenizer.json",
                                   prompt, seq_len, threads=threads, timeout=run_timeout)
        if i > 0:
            runs.append(stats)
    latency = stats_to_latency(runs)
    latency["warmup"] = 1
    return {
        "format": "pte",
        "runtime": f"executorch ({runner_path.name})",
        "threads": threads,
        "latency": latency,
        "device": {"serial": device.serial, **device.info, **props},
        "deployed_to": remote,
    }
