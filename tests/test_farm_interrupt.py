"""The device farm against hostile or unlucky conditions (issue "A bundle is untrusted input").

Ctrl-C / SIGTERM mid-run, a known_hosts path with a space, ssh failing or a device freezing, device
output in the HTML page, unwritable report paths, a workdir that looks like an option. The devices
are this machine (local transport) and the private OpenSSH server of tests/sshd.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

import sshd as sshd_mod
from exporter.farm import BundleRun, Check, DeviceReport, Farm, FarmFileError, html_report, load_farm, run_farm
from test_farm import _device_processes, own_server, server, ssh_device, write_farm  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bundle(farm_bundle):
    return farm_bundle


def start_cli(*args, cwd=ROOT, tmp: Path) -> tuple[subprocess.Popen, Path]:
    """`slm-export ...` as a user starts it, in the background; stderr goes to a file (no pipe to fill)."""
    err = tmp / "cli.stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), env=env, cwd=cwd)
    return proc, err


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sleepy_python(tmp_path: Path, when: str) -> tuple[Path, Path]:
    """A device Python that sleeps 60 s (then runs the real one) on the ``run`` command (when="run")
    or on the check of the partial copy (when="partial"), and writes "<its pid> <sleep's pid>"."""
    pids = tmp_path / "sleeping.pids"
    match = '[ "$a" = run ]' if when == "run" else 'case "$a" in *.partial-*) true;; *) false;; esac'
    py = tmp_path / "python-sleepy"
    py.write_text(f'#!/bin/sh\nfor a in "$@"; do\n  if {match}; then\n    sleep 60 &\n'
                  f'    echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}\n    wait $!\n    break\n  fi\ndone\n'
                  f'exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return py, pids


# ---------------------------------------------------------------- Ctrl-C / SIGTERM


@pytest.mark.parametrize("when,sig", [("run", "SIGINT"), ("run", "SIGTERM"), ("partial", "SIGINT")])
def test_interrupt_stops_local_runs_and_writes_reports(bundle, tmp_path, when, sig):
    """Ctrl-C (or SIGTERM) during a local device's run or copy check: exit 130 within seconds, the
    sleeping device process group is killed, no partial folder is left, the finished device keeps
    its result, the unfinished one is "interrupted" in all three reports."""
    py, pids = sleepy_python(tmp_path, when)
    home = tmp_path / "home"
    farm = write_farm(tmp_path / "farm.toml", [
        {"name": "sleepy", "target": "host", "transport": "local", "python": str(py), "workdir": str(home),
         "decode_tokens": 4, "repeats": 1},
        {"name": "nopython", "target": "host", "transport": "local", "python": "/opt/nowhere/python3",
         "workdir": str(tmp_path / "h2")},
    ])
    rep = tmp_path / "rep"
    proc, err = start_cli("farm", "run", farm, "--bundle", bundle, "--json", rep / "r.json",
                          "--junit", rep / "r.xml", "--html", rep / "r.html", tmp=tmp_path)
    try:
        wait_for(lambda: pids.exists() or proc.poll() is not None, 90, "the device step to start sleeping")
        assert proc.poll() is None, err.read_text()[-3000:]
        shell_pid, sleep_pid = map(int, pids.read_text().split())
        t0 = time.time()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=15)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.read_text()
    assert code == 130, stderr[-3000:]
    assert elapsed < 10, elapsed
    assert "interrupted: 1 of 2 devices finished; reports written to" in stderr, stderr[-3000:]
    assert "nothing was written" not in stderr and "Traceback" not in stderr
    assert "sleepy" in stderr and "interrupted" in stderr  # the summary table
    wait_for(lambda: not alive(shell_pid) and not alive(sleep_pid), 3, "the device processes to be gone")
    devices = {d["name"]: d for d in json.loads((rep / "r.json").read_text())["devices"]}
    assert devices["sleepy"]["status"] == "interrupted", devices["sleepy"]
    assert devices["nopython"]["status"] == "down"  # finished before Ctrl-C: its result is kept
    assert "/opt/nowhere/python3" in devices["nopython"]["reason"]
    assert json.loads((rep / "r.json").read_text())["summary"]["interrupted"] == 1
    step = "run" if when == "run" else "deploy"
    assert f"during {step}" in devices["sleepy"]["reason"]
    xml = ET.parse(rep / "r.xml").getroot()
    assert any(e.get("type") == "interrupted" for e in xml.iter("error"))
    assert "interrupted" in (rep / "r.html").read_text()
    assert not list(home.rglob("*.partial-*"))  # the interrupted copy was removed


def test_interrupt_stops_the_remote_run(bundle, server, tmp_path):
    """Ctrl-C while the 'Pi' runs the bundle: the ssh client is killed, which ends the remote run too."""
    farm = write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "home", repeats=100000, timeout_s=120)])
    proc, err = start_cli("farm", "run", farm, "--bundle", bundle, "--json", tmp_path / "r.json", tmp=tmp_path)
    try:
        wait_for(lambda: _device_processes(server, "--support") or proc.poll() is not None, 90, "the remote run")
        assert proc.poll() is None, err.read_text()[-3000:]
        remote = [p.pid for p in _device_processes(server, "--support")]
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130 and elapsed < 10, (code, elapsed, err.read_text()[-3000:])
    wait_for(lambda: not any(alive(p) for p in remote), 5, "the remote run to stop")
    device = json.loads((tmp_path / "r.json").read_text())["devices"][0]
    assert device["status"] == "interrupted" and "during run" in device["reason"]


def test_cancel_refuses_new_steps_but_allows_cleanup():
    from targets.transports import LocalTransport, TransportError, cancel, cleanup_steps, reset_cancel

    t = LocalTransport()
    try:
        cancel()
        with pytest.raises(TransportError) as e:
            t.run(["true"], 10)
        assert e.value.kind == "interrupted"
        with cleanup_steps():
            assert t.run(["true"], 10).returncode == 0
    finally:
        reset_cancel()
    assert t.run(["true"], 10).returncode == 0


# ---------------------------------------------------------------- known_hosts path


def test_known_hosts_in_a_folder_with_a_space(bundle, server, tmp_path):
    """ssh splits UserKnownHostsFile at spaces (several files) and expands '%'; the path is quoted."""
    kh = tmp_path / "my keys 100%h" / "known_hosts"
    kh.parent.mkdir()
    server.write_known_hosts(kh)
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "home", known_hosts=str(kh), decode_tokens=4, repeats=1)]))
    report = run_farm(farm, [bundle])[0]
    assert report.status == "passed", report.reason


def test_known_hosts_with_a_double_quote_is_refused(tmp_path):
    from targets.transports import SshOptions, SshTransport

    path = write_farm(tmp_path / "farm.toml", [
        {"name": "pi", "target": "rpi", "host": "10.0.0.5", "known_hosts": str(tmp_path / 'a"b' / "known_hosts")}])
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert "farm.toml:" in err.value.message and "known_hosts" in err.value.message
    assert "double quote" in err.value.message
    with pytest.raises(Exception, match="double quote"):
        SshTransport(SshOptions(host="10.0.0.5", known_hosts='/x/"y'))


# ---------------------------------------------------------------- ssh failing, a device freezing


def _transport(**kw):
    from targets.transports import SshOptions, SshTransport

    return SshTransport(SshOptions(host="pi.local", **kw))


def test_classify_tells_ssh_failures_and_lost_devices_from_the_program():
    t = _transport()
    lost = t.classify("Timeout, server pi.local not responding.\r\n")
    assert lost.kind == "lost" and lost.device_down and "pi.local stopped answering" in lost.message
    assert "not responding" in lost.message and "keepalives for 15 s" in lost.hint
    assert t.classify("client_loop: send disconnect: Broken pipe\n").kind == "lost"
    own = t.classify('command-line line 0: Unsupported option "bogus"\n')
    assert own.kind == "ssh" and own.device_down and "ssh failed for pi.local" in own.message
    assert 'Unsupported option "bogus"' in own.message
    cfg = t.classify("/home/me/farm_ssh_config: line 3: Bad configuration option: bogus\n"
                     "/home/me/farm_ssh_config: terminating, 1 bad configuration options\n")
    assert cfg.kind == "ssh" and "line 3: Bad configuration option: bogus" in cfg.message
    assert t.classify("ssh: Could not resolve hostname pi.local: Name or service not known").kind == "connect"
    assert t.classify("Traceback (most recent call last):\nValueError: boom\n").kind == "command"


def test_ssh_exit_255_is_not_retried_as_a_program_result():
    from targets.transports import TransportError

    t = _transport(retries=2, retry_backoff_s=0)
    calls = []

    def attempt(stderr):
        calls.append(stderr)
        return 255, "", stderr, 0.1

    with pytest.raises(TransportError) as e:
        t._with_retries(lambda: attempt("Timeout, server pi.local not responding.\n"), ["x"], "the run")
    assert e.value.kind == "lost" and len(calls) == 1  # a frozen device is not hammered with retries
    res = t._with_retries(lambda: attempt("ValueError: boom\n"), ["x"], "the run")  # the program's own 255
    assert res.returncode == 255


def test_broken_ssh_config_is_reported_as_ssh_failing(bundle, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host test-pi\n  HostName 127.0.0.1\n  Bogus yes\n")
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        {"name": "pi", "target": "rpi", "ssh_alias": "test-pi", "ssh_config": str(cfg)}]))
    report = run_farm(farm, [bundle])[0]
    assert report.status == "down", report
    assert "ssh failed for test-pi" in report.reason and "Bad configuration option: bogus" in report.reason
    assert "python" not in {c.name for c in report.checks}


def test_frozen_device_is_reported_as_not_answering(own_server, tmp_path):
    """The device freezes mid-step (its sshd stopped with SIGSTOP): ssh's keepalives expire and the
    error says the device stopped answering, quoting ssh."""
    from targets.transports import SshOptions, SshTransport, TransportError

    t = SshTransport(SshOptions(host="127.0.0.1", port=own_server.port, user=own_server.user,
                                identity_file=str(own_server.client_key),
                                known_hosts=str(own_server.root / "known_hosts"),
                                alive_interval_s=1, alive_count_max=2, retries=0))
    marker = "slm-frozen-marker"

    def freeze():
        wait_for(lambda: _device_processes(own_server, marker), 30, "the remote program")
        for p in [psutil.Process(own_server.proc.pid)] + psutil.Process(own_server.proc.pid).children(recursive=True):
            if marker not in p.cmdline():
                p.send_signal(signal.SIGSTOP)

    threading.Thread(target=freeze, daemon=True).start()
    t0 = time.time()
    with pytest.raises(TransportError) as e:
        t.run([sys.executable, "-c", "import time; time.sleep(40)", marker], 60, what="the run")
    assert time.time() - t0 < 20
    assert e.value.kind == "lost" and e.value.device_down
    assert "127.0.0.1" in e.value.message and "stopped answering" in e.value.message
    assert "not responding" in e.value.message


# ---------------------------------------------------------------- the HTML page


def test_html_report_escapes_device_bundle_and_farm_values():
    evil = "<script>alert(1)</script>"
    probe = {"hostname": evil, "cpu_count": evil, "machine": evil, "os": evil, "python": evil}
    run = BundleRun("b", f"onnx/{evil}", "onnx", evil, 1, checks=[Check(evil, "passed", evil)],
                    result={"runtime": "<img src=x onerror=alert(1)>", "runtime_version": evil, "latency": {}})
    r = DeviceReport(evil, evil, "ssh", evil, status="passed", reason=evil, probe=probe, runs=[run],
                     checks=[Check("connect", "passed", evil)])
    page = html_report([r], Farm(path=Path(f"/farms/{evil}.toml"), devices=[]))
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; CPUs" in page


# ---------------------------------------------------------------- report paths


def test_unwritable_report_path_fails_before_any_device_work(bundle, tmp_path):
    touched = tmp_path / "device-was-contacted"
    py = tmp_path / "python-marker"
    py.write_text(f"#!/bin/sh\ntouch {touched}\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    farm = write_farm(tmp_path / "farm.toml", [
        {"name": "here", "target": "host", "transport": "local", "python": str(py), "workdir": str(tmp_path / "h")}])
    t0 = time.time()
    proc, err = start_cli("farm", "run", farm, "--bundle", bundle, "--html", tmp_path / "ok.html",
                          "--json", "/proc/x/y.json", tmp=tmp_path)
    code = proc.wait(timeout=60)
    stderr = err.read_text()
    assert code == 1, stderr[-3000:]
    assert "cannot write the report: --json /proc/x/y.json" in stderr and "Traceback" not in stderr
    assert not touched.exists() and not (tmp_path / "h").exists()
    assert time.time() - t0 < 30


def test_check_report_paths(tmp_path):
    from exporter.farm import check_report_paths

    check_report_paths({"--json": tmp_path / "new" / "r.json", "--html": None})
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())  # the probe file is gone
    with pytest.raises(Exception, match="--junit .*folder"):
        check_report_paths({"--junit": tmp_path})


# ---------------------------------------------------------------- workdir


def test_workdir_may_not_start_with_a_dash(tmp_path):
    from exporter.errors import DeviceError
    from targets.transports import check_remote_path

    path = write_farm(tmp_path / "farm.toml", [{"name": "pi", "target": "rpi", "host": "h", "workdir": "-rf"}])
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert "farm.toml:" in err.value.message and "workdir '-rf'" in err.value.message
    assert "not starting with '-'" in err.value.message
    for bad in ("-rf", "--help", "-"):
        with pytest.raises(DeviceError):
            check_remote_path(bad)
    assert check_remote_path("farm/-x") == "farm/-x"  # a '-' later on is never read as an option
