"""Emulated ARM64 boards (exporter/emulate.py) as farm devices, with the real QEMU and real aarch64 builds.

The board is built once per session into a private cache (Debian arm64 python3 via a private apt,
aarch64 wheels via pip, ~70 MB of downloads); CI builds it from scratch, so the build is timed and
bounded. Needs Debian's qemu-user-static (skipped with the install hint without it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import run_cli
from test_farm import write_farm
from exporter import emulate
from exporter.errors import DeviceError
from exporter.farm import FarmFileError, load_farm, run_farm

ROOT = Path(__file__).resolve().parent.parent
BUILD_BUDGET_S = 300  # a fresh build (downloads included) must stay a small part of CI's time


def _need_qemu():
    if not shutil.which(emulate.QEMU):
        pytest.skip(f"{emulate.QEMU} is not installed: {emulate.QEMU_HINT}")


def _cli(*args, cache: Path, timeout=900):
    """The real console entry point with ``cache`` as $SLM_EXPORT_CACHE (where boards live)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLM_EXPORT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def board_cache(tmp_path_factory):
    """A private cache holding the emulated pi5, built once for the session (timed)."""
    _need_qemu()
    cache = tmp_path_factory.mktemp("emulated-cache")
    t0 = time.perf_counter()
    res = emulate.ensure_board("pi5", cache)
    elapsed = time.perf_counter() - t0
    print(f"\nemulated pi5 built in {elapsed:.1f} s ({res.info['bytes'] / 1e6:.0f} MB rootfs)")
    assert res.built and elapsed < BUILD_BUDGET_S
    return cache


@pytest.fixture(scope="module")
def tiny_bundles(tiny_model_dir, tmp_path_factory):
    """Tiny rpi bundles, ONNX int8-dynamic and TFLite int8-dynamic, built with the real CLI."""
    out = tmp_path_factory.mktemp("emu-bundles")
    bundles = []
    for fmt in ("onnx", "tflite"):
        proc = run_cli("--target", "rpi", "--model", tiny_model_dir("llama"), "--format", fmt,
                       "--recipe", "int8-dynamic", "--out", out / fmt, "--decode-tokens", "4", "--repeats", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        bundles.append(out / fmt)
    return bundles


# ---------------------------------------------------------------- building


def test_build_is_cached_and_runs_aarch64_runtimes(board_cache):
    """The build left an aarch64 Python with the three runtimes; a second call and another board reuse it."""
    root = board_cache / "emulated"
    stamp = json.loads((root / "rootfs" / ".slm-emulated.json").read_text())
    assert any(d.startswith("libpython3") for d in stamp["debs"])
    assert {w.split("-")[0] for w in stamp["wheels"]} >= {"numpy", "onnxruntime", "ai_edge_litert"}
    assert all("aarch64" in w or "-none-any" in w or "abi3" in w for w in stamp["wheels"]), stamp["wheels"]
    # The host was not turned multi-arch: apt's arm64 state lives only in the private folder.
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    assert "arm64" not in foreign.split()
    t0 = time.perf_counter()
    again = emulate.ensure_board("pi5", board_cache)
    assert not again.built and time.perf_counter() - t0 < 5
    pi4 = emulate.ensure_board("pi4", board_cache)  # another board: same rootfs, its own cpuinfo
    assert not pi4.built and (pi4.prefix / "usr").resolve() == (root / "rootfs" / "usr").resolve()
    assert "0xd08" in (pi4.prefix / "proc" / "cpuinfo").read_text()
    smoke = emulate.smoke_test(pi4)
    assert smoke["machine"] == "aarch64" and smoke["onnxruntime"] and smoke["ai-edge-litert"]
    # The device sees the board's CPU, not the host's.
    proc = subprocess.run([*pi4.argv(), "-c", "print(open('/proc/cpuinfo').read())"], capture_output=True,
                          text=True, timeout=120, env=emulate.device_env())
    assert "Raspberry Pi 4" in proc.stdout and "0xd08" in proc.stdout


def test_cli_reports_the_cached_board_and_what_it_installed(board_cache):
    proc = _cli("device", "emulate", "pi5", cache=board_cache, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "reused from the cache" in out and "-cpu cortex-a76" in out
    assert "machine aarch64" in out and str(board_cache / "emulated") in out
    assert "slm-export device emulate --clean" in out and 'transport = "emulated"' in out and "[[device]]" in out


def test_clean_removes_everything_in_one_command(tmp_path):
    fake = tmp_path / "emulated" / "rootfs" / "usr"
    fake.mkdir(parents=True)
    (fake / "x").write_bytes(b"0" * 1000)
    proc = _cli("device", "emulate", "--clean", cache=tmp_path, timeout=60)
    assert proc.returncode == 0 and "removed" in proc.stdout and not (tmp_path / "emulated").exists()
    proc = _cli("device", "emulate", "--clean", cache=tmp_path, timeout=60)
    assert proc.returncode == 0 and "nothing to remove" in proc.stdout


def test_missing_qemu_is_one_error_with_the_install_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLM_EXPORT_CACHE": str(tmp_path), "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "device", "emulate", "pi5"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "qemu-aarch64-static is not installed" in proc.stderr and "apt-get install qemu-user-static" in proc.stderr
    assert not (tmp_path / "emulated").exists()  # nothing was downloaded for a board that cannot run


def test_build_key_follows_the_runtime_versions():
    a = emulate.build_key({"numpy": "2.4.6", "onnxruntime": "1.31.1", "ai-edge-litert": "2.3.0"})
    b = emulate.build_key({"numpy": "2.4.6", "onnxruntime": "1.30.0", "ai-edge-litert": "2.3.0"})
    assert a != b


# ---------------------------------------------------------------- the farm


def test_farm_file_needs_a_known_board(tmp_path):
    farm = write_farm(tmp_path / "f.toml", [{"name": "pi", "target": "rpi", "transport": "emulated"}])
    with pytest.raises(FarmFileError, match=r"f\.toml:4: .*board = one of pi4, pi5, android-arm64"):
        load_farm(farm)
    farm = write_farm(tmp_path / "g.toml", [{"name": "pi", "target": "rpi", "transport": "emulated", "board": "pi9"}])
    with pytest.raises(FarmFileError, match="got 'pi9'"):
        load_farm(farm)
    # The board's Python is the emulated one: a host Python there would silently run x86 kernels.
    farm = write_farm(tmp_path / "h.toml", [{"name": "pi", "target": "rpi", "transport": "emulated", "board": "pi5",
                                             "python": sys.executable}])
    with pytest.raises(FarmFileError, match="h.toml:6: .*runs the board's own aarch64 Python"):
        load_farm(farm)


@pytest.mark.slow
def test_unbuilt_board_is_down_with_the_build_command(tmp_path, monkeypatch, tiny_bundles):
    _need_qemu()
    monkeypatch.setenv("SLM_EXPORT_CACHE", str(tmp_path / "empty"))
    farm = load_farm(write_farm(tmp_path / "f.toml", [
        {"name": "pi", "target": "rpi", "transport": "emulated", "board": "pi5"}]))
    report = run_farm(farm, [tiny_bundles[0]])[0]
    assert report.status == "down" and "slm-export device emulate pi5" in report.reason
    with pytest.raises(DeviceError):
        emulate.load_board("pi5", tmp_path / "empty")


@pytest.mark.slow
def test_host_and_emulated_boards_in_one_farm_run(board_cache, tiny_bundles, tmp_path):
    """The same tiny ONNX and TFLite int8-dynamic bundles on this machine, the emulated Pi 5 and the
    emulated Armv9 phone (TFLite only: the android target does not run ONNX)."""
    farm = write_farm(tmp_path / "farm.toml", [
        {"name": "here", "target": "host", "transport": "local", "python": sys.executable,
         "workdir": str(tmp_path / "host-home")},
        {"name": "pi5-emu", "target": "rpi", "transport": "emulated", "board": "pi5",
         "workdir": str(tmp_path / "pi5-home")},
        {"name": "phone-emu", "target": "android", "transport": "emulated", "board": "android-arm64",
         "workdir": str(tmp_path / "phone-home")},
    ], defaults={"decode_tokens": 4, "repeats": 1})
    t0 = time.perf_counter()
    proc = _cli("farm", "run", farm, *[x for b in tiny_bundles for x in ("--bundle", b)],
                "--json", tmp_path / "r.json", "--html", tmp_path / "r.html", cache=board_cache, timeout=900)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "emulated: latency is not device latency" in proc.stdout
    devices = {d["name"]: d for d in json.loads((tmp_path / "r.json").read_text())["devices"]}
    assert devices["here"]["status"] == devices["pi5-emu"]["status"] == devices["phone-emu"]["status"] == "passed"
    emu = devices["pi5-emu"]
    assert emu["transport"] == "emulated" and "cortex-a76" in emu["label"]
    assert "latency is not device latency" in emu["label"] and emu["reason"] == emulate.EMULATED_NOTE
    assert emu["probe"]["machine"] == "aarch64"
    figures = {}
    for name, dev in devices.items():
        for run in dev["runs"]:
            checks = {c["name"]: c for c in run["checks"]}
            if name == "phone-emu" and run["format"] == "onnx":
                assert checks["format"]["status"] == "skipped"
                continue
            assert checks["run"]["status"] == "passed" and checks["parity"]["status"] == "passed", checks
            result = run["result"]
            assert result["device"]["machine"] == ("aarch64" if name.endswith("-emu") else os.uname().machine)
            figures[name, run["label"]] = result["parity"]
        if name.endswith("-emu"):  # budgets are not judged on emulated latency
            assert all({c["name"]: c for c in r["checks"]}["budget"]["status"] == "skipped" for r in dev["runs"]
                       if r["result"])
    for (name, label), arm in sorted(figures.items()):
        host = figures["here", label]
        print(f"{label} on {name}: max|err| {arm['max_abs_err']:.5g} top-1 {arm['top1_agreement']:.3f} "
              f"(host: {host['max_abs_err']:.5g}, {host['top1_agreement']:.3f})")
        # ARM kernels round differently from x86 ones, but not by more than the quantization itself.
        assert arm["top1_agreement"] >= 0.9 and abs(arm["max_abs_err"] - host["max_abs_err"]) < 0.05
    assert "pi5-emu" in (tmp_path / "r.html").read_text()
    print(f"farm run (host + emulated pi5 + emulated phone, 2 bundles): {elapsed:.1f} s")


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_smollm2_onnx_int8_on_host_and_emulated_pi5(board_cache, tmp_path):
    """The rpi default bundle of the embedded SmolLM2 (ONNX int8-dynamic) on this machine and the emulated Pi 5.

    A few minutes (export ~2 min; the emulated run ~3 min). Measured: host top-1 0.78, ppl +14%, greedy
    identical; emulated Pi 5 (and Pi 4) top-1 0.75, ppl +19%, greedy differs from the first token:
    onnxruntime's ARM int8 path misses the recipe's thresholds that the x86 one passes. So this test
    checks that the emulated figures are measured and near the host's, not that they pass.
    Kept out of the default run (CI time): ``SLM_EXPORT_REAL_EMULATED=1 pytest tests/test_emulate.py -m slow``.
    """
    if not os.environ.get("SLM_EXPORT_REAL_EMULATED"):
        pytest.skip("real SmolLM2 under emulation takes ~6 min; run it with SLM_EXPORT_REAL_EMULATED=1")
    out = tmp_path / "rpi"
    proc = run_cli("--target", "rpi", "--out", out, "--no-latency", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        {"name": "here", "target": "host", "transport": "local", "python": sys.executable,
         "workdir": str(tmp_path / "host-home")},
        {"name": "pi5-emu", "target": "rpi", "transport": "emulated", "board": "pi5",
         "workdir": str(tmp_path / "pi5-home")},
    ], defaults={"decode_tokens": 4, "repeats": 1, "warmup": 0}))
    old = os.environ.get("SLM_EXPORT_CACHE")
    os.environ["SLM_EXPORT_CACHE"] = str(board_cache)  # where the session's board was built
    try:
        reports = {r.name: r for r in run_farm(farm, [out])}
    finally:
        if old is None:
            os.environ.pop("SLM_EXPORT_CACHE")
        else:
            os.environ["SLM_EXPORT_CACHE"] = old
    figures = {}
    for name, report in reports.items():
        (run,) = report.runs
        checks = {c.name: c for c in run.checks}
        assert checks["run"].status == "passed", checks
        assert checks["parity"].status in ("passed", "failed") and run.result["parity"]["positions"] >= 32
        figures[name] = run.result["parity"]
        print(f"SmolLM2 onnx/int8-dynamic on {name} ({run.result['device']['machine']}): "
              f"{checks['parity'].status}: {checks['parity'].message}")
    assert reports["pi5-emu"].runs[0].result["device"]["machine"] == "aarch64"
    assert {c.name: c for c in reports["here"].runs[0].checks}["parity"].status == "passed"
    host, arm = figures["here"], figures["pi5-emu"]
    assert abs(host["top1_agreement"] - arm["top1_agreement"]) <= 0.1
    assert abs(host["ppl_rel_change"] - arm["ppl_rel_change"]) <= 0.15
