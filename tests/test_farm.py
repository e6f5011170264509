"""The device farm against real devices: a private OpenSSH server on 127.0.0.1 plays a Raspberry Pi.

No fake ssh: the farm uses the system ssh/scp against Debian's sshd (tests/sshd.py), with this
machine's Python (numpy + onnxruntime) as the device's Python, and one tiny ONNX bundle built
through the CLI for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import sshd as sshd_mod
from test_cli import run_cli
from exporter.errors import DeviceError
from exporter.farm import FarmFileError, load_farm, run_farm, write_reports

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def bundle(farm_bundle):
    """One tiny rpi bundle (ONNX int8-dynamic) built with the real CLI (conftest.farm_bundle)."""
    return farm_bundle


def _need_sshd():
    reason = sshd_mod.available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The 'Raspberry Pi': a private sshd shared by the module."""
    _need_sshd()
    root = tmp_path_factory.mktemp("pi-sshd")
    srv = sshd_mod.PrivateSshd(root).start()
    srv.write_known_hosts(root / "known_hosts")
    yield srv
    srv.kill_everything()


@pytest.fixture
def own_server(tmp_path):
    """A private sshd this test may stop or kill."""
    _need_sshd()
    srv = sshd_mod.PrivateSshd(tmp_path / "own-sshd").start()
    srv.write_known_hosts(srv.root / "known_hosts")
    yield srv
    srv.kill_everything()


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_farm(path: Path, devices: list[dict], defaults: dict | None = None) -> Path:
    lines = []
    if defaults:
        lines += ["[defaults]"] + [f"{k} = {toml_value(v)}" for k, v in defaults.items()] + [""]
    for d in devices:
        lines += ["[[device]]"] + [f"{k} = {toml_value(v)}" for k, v in d.items()] + [""]
    path.write_text("\n".join(lines))
    return path


def ssh_device(srv, name: str, workdir: Path, **kw) -> dict:
    return {"name": name, "target": "rpi", "transport": "ssh", "host": "127.0.0.1", "port": srv.port,
            "user": srv.user, "identity_file": str(srv.client_key), "known_hosts": str(srv.root / "known_hosts"),
            "python": sys.executable, "workdir": str(workdir), "decode_tokens": 8, "repeats": 2, **kw}


def checks(report) -> dict:
    return {(p + " " if p else "") + c.name: c for p, c in report.all_checks()}


def blocked_python(tmp_path: Path, module: str) -> Path:
    """A device Python on which ``module`` cannot be imported (as on a board where it is not installed)."""
    block = tmp_path / f"no-{module}"
    block.mkdir()
    (block / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    py = tmp_path / f"python-without-{module}"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={block}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return py


# ---------------------------------------------------------------- the whole flow


def test_farm_cli_deploys_runs_and_reports(bundle, server, tmp_path):
    """`slm-export farm run` over ssh (the 'Pi') and locally: deploy, run, parity, budgets, 3 reports."""
    farm = write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "pi-home"),
        {"name": "here", "target": "host", "transport": "local", "python": sys.executable,
         "workdir": str(tmp_path / "local-home")},
        ssh_device(server, "pi-strict", tmp_path / "strict-home", budgets={"decode_tok_s_min": 1e9}),
    ], defaults={"decode_tokens": 8, "repeats": 2})
    t0 = time.time()
    proc = run_cli("farm", "run", farm, "--bundle", bundle, "--junit", tmp_path / "r.xml",
                   "--json", tmp_path / "r.json", "--html", tmp_path / "r.html", timeout=300)
    elapsed = time.time() - t0
    assert proc.returncode == 4, proc.stderr[-3000:]  # pi-strict misses its budget on purpose
    assert "1 of 3 devices did not pass: pi-strict" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    devices = {d["name"]: d for d in report["devices"]}
    assert devices["pi"]["status"] == "passed" and devices["here"]["status"] == "passed", json.dumps(devices)[:3000]
    pi_checks = {c["name"]: c for c in devices["pi"]["runs"][0]["checks"]}
    assert [c["status"] for c in devices["pi"]["checks"]] == ["passed", "passed"]
    for name in ("runtime", "deploy", "run", "parity", "budget"):
        assert pi_checks[name]["status"] == "passed", pi_checks[name]
    result = devices["pi"]["runs"][0]["result"]
    assert result["runtime"] == "onnxruntime" and result["runtime_version"]
    assert result["parity"]["top1_agreement"] >= 0.8 and result["latency"]["decode_tok_s"] > 0
    assert result["device"]["cpu_count"] >= 1 and len(result["latency"]["per_token_ms_samples"]) == 16
    # The budget miss is a failed check that quotes the measured figure and the budget.
    strict = {c["name"]: c for c in devices["pi-strict"]["runs"][0]["checks"]}
    assert strict["budget"]["status"] == "failed"
    assert "missed the rpi budget: decode" in strict["budget"]["message"] and "< 1e+09" in strict["budget"]["message"]
    # Deployed: bundle + device-side runtime, atomically (no partial folder left behind).
    dest = Path(pi_checks["deploy"]["data"]["dest"])
    assert (dest / "bundle" / "model.onnx").exists() and (dest / "slm_runtime" / "main.py").exists()
    assert not list(dest.parent.glob("*.partial-*")) and not list(dest.parent.glob("*.old-*"))
    # JUnit: one suite per device, the budget miss as a failure.
    xml = ET.parse(tmp_path / "r.xml").getroot()
    assert xml.get("failures") == "1" and xml.get("errors") == "0"
    suites = {s.get("name"): s for s in xml.iter("testsuite")}
    assert set(suites) == {"farm.pi", "farm.here", "farm.pi-strict"}
    failure = suites["farm.pi-strict"].find(".//failure")
    assert failure is not None and "decode" in failure.get("message")
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "pi-strict" in page
    print(f"farm of 3 devices: {elapsed:.1f} s")


def test_redeploy_is_skipped_when_intact_and_repaired_when_damaged(bundle, server, tmp_path):
    farm = load_farm(write_farm(tmp_path / "farm.toml", [ssh_device(server, "pi", tmp_path / "home")]))
    first = run_farm(farm, [bundle])[0]
    dest = Path(checks(first)["onnx/int8-dynamic deploy"].data["dest"])
    assert checks(first)["onnx/int8-dynamic deploy"].data["copied"] is True
    second = run_farm(farm, [bundle])[0]
    assert second.status == "passed" and checks(second)["onnx/int8-dynamic deploy"].data["copied"] is False
    # A damaged file on the device is noticed by its hash and the bundle is deployed again.
    model = dest / "bundle" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    third = run_farm(farm, [bundle])[0]
    assert third.status == "passed" and checks(third)["onnx/int8-dynamic deploy"].data["copied"] is True
    assert model.read_bytes() == (bundle / "model.onnx").read_bytes()


def test_pytest_device_tests_with_farm_option(bundle, server, tmp_path):
    farm = write_farm(tmp_path / "farm.toml", [ssh_device(server, "pi", tmp_path / "home")])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "device_tests",
                           "--farm", str(farm), "--bundle", str(bundle), "--farm-report", str(tmp_path / "rep"),
                           "--junitxml", str(tmp_path / "pytest.xml")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    assert (tmp_path / "rep" / "farm.html").exists() and (tmp_path / "pytest.xml").exists()
    # Without --farm the device tests skip instead of failing.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "device_tests", "-rs"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0 and "no --farm FARM given" in proc.stdout


# ---------------------------------------------------------------- trust and reachability


def test_wrong_host_key_is_refused_with_how_to_verify(bundle, server, tmp_path):
    sshd_mod.keygen(tmp_path / "impostor")
    kind, key = (tmp_path / "impostor.pub").read_text().split()[:2]
    bad_kh = tmp_path / "known_hosts"
    bad_kh.write_text(f"[127.0.0.1]:{server.port} {kind} {key}\n")
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "home", known_hosts=str(bad_kh))]))
    report = run_farm(farm, [bundle])[0]
    assert report.status == "down"
    assert "host key does NOT match" in report.reason and str(bad_kh) in report.reason
    assert "ssh-keygen -lf" in report.reason and "ssh-keyscan -p" in report.reason
    assert not (tmp_path / "home").exists()  # nothing was copied to an untrusted device
    assert bad_kh.read_text().split()[2] == key  # and known_hosts was not "fixed" behind the user's back


def test_unknown_host_key_needs_first_contact(server, tmp_path):
    from targets.transports import SshOptions, SshTransport, TransportError

    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    opts = SshOptions(host="127.0.0.1", port=server.port, user=server.user, identity_file=str(server.client_key),
                      known_hosts=str(kh), retries=0)
    with pytest.raises(TransportError) as err:
        SshTransport(opts).run(["true"], 30)
    assert err.value.kind == "hostkey" and "not in" in err.value.message and "first_contact" in err.value.hint
    opts.first_contact = True  # StrictHostKeyChecking=accept-new: the unknown key is accepted once and saved
    assert SshTransport(opts).run(["true"], 30).returncode == 0
    assert server.known_hosts_line().split()[2] in kh.read_text()


def test_ssh_config_host_alias(server, tmp_path):
    """A device given as a Host alias of an ssh_config file (identity and known_hosts live there)."""
    from exporter.farm import make_transport

    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host test-pi\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.user}\n"
                   f"  IdentityFile {server.client_key}\n  UserKnownHostsFile {server.root / 'known_hosts'}\n")
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        {"name": "pi", "target": "rpi", "ssh_alias": "test-pi", "ssh_config": str(cfg)}]))
    res = make_transport(farm.devices[0]).run(["uname", "-n"], 30)
    assert res.returncode == 0 and res.stdout.strip() == os.uname().nodename


def test_remote_arguments_arrive_verbatim(server, tmp_path):
    """Arguments with spaces, quotes and shell syntax reach the device as the same argv, unexpanded."""
    from targets.transports import SshOptions, SshTransport

    t = SshTransport(SshOptions(host="127.0.0.1", port=server.port, user=server.user,
                                identity_file=str(server.client_key), known_hosts=str(server.root / "known_hosts")))
    canary = tmp_path / "pwned"
    args = ["a b", "it's", "$(touch " + str(canary) + ")", "`id`", "*", "; rm -rf /nonexistent", "-n", ""]
    res = t.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *args], 30)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == args
    assert not canary.exists()


def test_stopped_and_hung_devices_are_down_and_the_others_still_run(bundle, server, own_server, tmp_path):
    import socket

    own_server.stop()  # sshd stopped: connection refused
    hung = socket.socket()  # accepts TCP but never speaks SSH: only ConnectTimeout ends the wait
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        farm = load_farm(write_farm(tmp_path / "farm.toml", [
            ssh_device(own_server, "stopped", tmp_path / "h1", retries=1),
            ssh_device(server, "hung", tmp_path / "h2", port=hung.getsockname()[1], connect_timeout_s=2, retries=1),
            ssh_device(server, "alive", tmp_path / "h3"),
        ]))
        t0 = time.time()
        reports = {r.name: r for r in run_farm(farm, [bundle])}
        elapsed = time.time() - t0
    finally:
        hung.close()
    assert reports["stopped"].status == "down" and "Connection refused" in reports["stopped"].reason
    assert "unreachable" in reports["stopped"].reason
    assert reports["hung"].status == "down" and "timed out" in reports["hung"].reason
    assert reports["alive"].status == "passed", reports["alive"].reason
    # 2 attempts x 2 s connect timeout + 1 s backoff for the hung one; devices run in parallel.
    assert elapsed < 30, elapsed
    xml = ET.fromstring(__import__("exporter.farm", fromlist=["junit_xml"]).junit_xml(list(reports.values())))
    assert xml.get("errors") == "2"


def test_auth_failure_names_the_key_and_the_fix(bundle, server, tmp_path):
    stranger = sshd_mod.keygen(tmp_path / "stranger_key")
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "home", identity_file=str(stranger))]))
    t0 = time.time()
    report = run_farm(farm, [bundle])[0]
    assert report.status == "down" and "authentication refused" in report.reason
    assert str(stranger) in report.reason and "ssh-copy-id" in report.reason
    assert time.time() - t0 < 15  # not retried: a refused key needs a person


@pytest.mark.parametrize("module,check,package", [("onnxruntime", "onnx/int8-dynamic runtime", "pip install onnxruntime"),
                                                  ("numpy", "python", "pip install numpy")])
def test_device_without_the_runtime(bundle, server, tmp_path, module, check, package):
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "bare-pi", tmp_path / "home", python=str(blocked_python(tmp_path, module)))]))
    report = run_farm(farm, [bundle])[0]
    assert report.status == "failed"
    c = checks(report)[check]
    assert c.status == "failed" and package in c.message and module in c.message
    assert not (tmp_path / "home").exists()  # nothing deployed to a device that cannot run it


def test_missing_device_python(bundle, server, tmp_path):
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "pi", tmp_path / "home", python="/opt/nowhere/bin/python3")]))
    report = run_farm(farm, [bundle])[0]
    assert report.status == "failed"
    assert "/opt/nowhere/bin/python3" in checks(report)["python"].message and "line 1" in checks(report)["python"].message


# ---------------------------------------------------------------- dying mid-run


def test_run_past_its_deadline_is_stopped(bundle, server, tmp_path):
    """A run that would take minutes is stopped on the device at its deadline and reported; no hang."""
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(server, "slow-pi", tmp_path / "home", repeats=100000, timeout_s=4)]))
    t0 = time.time()
    report = run_farm(farm, [bundle])[0]
    elapsed = time.time() - t0
    run = checks(report)["onnx/int8-dynamic run"]
    assert report.status == "failed" and run.status == "failed"
    assert "exceeded its deadline of 4 s" in run.message
    assert elapsed < 30, elapsed
    assert not _device_processes(server, "--support")  # the runner is gone from the device


def _device_processes(srv, marker: str) -> list:
    import psutil

    try:
        procs = psutil.Process(srv.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if marker in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_device_dying_mid_run_is_reported_down(bundle, own_server, server, tmp_path):
    """Power loss during the run (sshd and everything it started killed): down, with where it was lost."""
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        ssh_device(own_server, "doomed", tmp_path / "h1", repeats=100000, timeout_s=120, retries=1),
        ssh_device(server, "fine", tmp_path / "h2"),
    ]))
    killed = threading.Event()

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not _device_processes(own_server, "--support"):
            time.sleep(0.1)
        time.sleep(0.5)
        own_server.kill_everything()
        killed.set()

    threading.Thread(target=killer, daemon=True).start()
    t0 = time.time()
    reports = {r.name: r for r in run_farm(farm, [bundle])}
    elapsed = time.time() - t0
    assert killed.is_set()
    assert reports["doomed"].status == "down", reports["doomed"].reason
    assert "lost during run" in reports["doomed"].reason
    assert reports["fine"].status == "passed"
    assert elapsed < 60, elapsed


# ---------------------------------------------------------------- atomic copy


def test_failed_copy_never_claims_the_destination(server, tmp_path):
    from targets.transports import SshOptions, SshTransport

    t = SshTransport(SshOptions(host="127.0.0.1", port=server.port, user=server.user,
                                identity_file=str(server.client_key), known_hosts=str(server.root / "known_hosts")))
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(os.urandom(4096))
    dest = tmp_path / "device" / "deployed"

    def damaged(partial):
        assert (Path(partial) / "bundle" / "model.onnx").exists()  # the copy landed in the partial folder
        raise DeviceError("files arrived damaged: bundle/model.onnx (sha256 differs)")

    with pytest.raises(DeviceError) as err:
        t.deploy({"bundle": src}, str(dest), verify=damaged)
    assert "nothing was deployed" in err.value.message and "damaged" in err.value.message
    assert not dest.exists() and not list(dest.parent.glob("*.partial-*"))
    assert t.deploy({"bundle": src}, str(dest)) == str(dest)
    assert (dest / "bundle" / "model.onnx").read_bytes() == (src / "model.onnx").read_bytes()


# ---------------------------------------------------------------- the farm file


def test_typo_in_farm_file_names_line_and_field(tmp_path):
    path = tmp_path / "farm.toml"
    path.write_text(
        "[defaults]\n"
        "python = \"python3\"\n"
        "\n"
        "[[device]]\n"
        "name = \"pi5\"\n"
        "target = \"rpi\"\n"
        "host = \"10.0.0.5\"\n"
        "\n"
        "[[device]]\n"
        "name = \"pi4\"\n"
        "target = \"rpi\"\n"
        "hots = \"10.0.0.4\"\n"
    )
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert f"{path}:12:" in err.value.message and "unknown field 'hots'" in err.value.message
    assert "did you mean 'host'" in err.value.hint
    # The CLI says the same, as one message without a traceback.
    (tmp_path / "b").mkdir()
    proc = run_cli("farm", "run", path, "--bundle", tmp_path / "b", timeout=120)
    assert proc.returncode == 1 and "farm.toml:12: device #2: unknown field 'hots'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("body,line,words", [
    ('name = "pi"\ntarget = "rpi"\ntransport = "sssh"\nhost = "h"\n', 5, ["transport must be one of local, ssh", "'sssh'"]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\npassword = "hunter2"\n', 6, ["'password'", "secrets are not accepted"]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\nport = "22"\n', 6, ["port must be an integer"]),
    ('name = "pi"\ntarget = "rpy"\nhost = "h"\n', 4, ["unknown target 'rpy'", ]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\nbudgets = { decode_tok_min = 5 }\n', 6, ["unknown budget 'decode_tok_min'"]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\nrepeats = 0\n', 6, ["repeats must be > 0"]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\nworkdir = "../../etc"\n', 6, ["workdir", "plain path"]),
    ('name = "pi"\ntarget = "rpi"\n', 2, ["exactly one of host or ssh_alias"]),
    ('name = "pi"\ntarget = "rpi"\nhost = "h"\nidentity_file = "/nonexistent/key"\n', 6, ["identity_file", "does not exist"]),
])
def test_bad_values_name_line_and_field(tmp_path, body, line, words):
    path = tmp_path / "farm.toml"
    path.write_text("# my farm\n[[device]]\n" + body)
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert f"farm.toml:{line}:" in str(err.value), str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_inline_private_key_and_toml_syntax_errors(tmp_path):
    path = tmp_path / "farm.toml"
    path.write_text('[[device]]\nname = "pi"\ntarget = "rpi"\nhost = "h"\n'
                    'identity_file = """-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"""\n')
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert "farm.toml:5:" in err.value.message and "inline private key" in err.value.message
    path.write_text('[[device]]\nname = "pi"\ntarget = rpi\n')
    with pytest.raises(FarmFileError) as err:
        load_farm(path)
    assert "not valid TOML" in err.value.message and "line 3" in err.value.message


# ---------------------------------------------------------------- Jetson


def test_jetson_profiles_and_trtexec_parsing():
    from targets import get_target
    from targets.jetson import parse_trtexec, provider_options, shape_profile, trtexec_argv

    t = get_target("jetson")
    assert t.formats == ("onnx",) and t.default_recipe("onnx") == "fp16" and t.budgets.decode_tok_s_min
    spec = {"kind": "causal-lm", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "recipe": "int8-static",
            "max_context": None}
    assert shape_profile(spec, 5, 1).split(",")[:4] == ["input_ids:1x1", "attention_mask:1x6", "position_ids:1x1",
                                                       "past_key_values.0.key:1x2x5x16"]
    trt = provider_options(spec, "/d/trt_cache")["TensorrtExecutionProvider"]
    assert trt["trt_int8_enable"] == "True" and trt["trt_engine_cache_path"] == "/d/trt_cache"
    assert "past_key_values.1.value:1x2x511x16" in trt["trt_profile_max_shapes"]
    argv = trtexec_argv("/usr/src/tensorrt/bin/trtexec", "/d/bundle/model.onnx", spec, 64)
    assert "--int8" in argv and "--fp16" in argv and any(a.startswith("--optShapes=input_ids:1x1,") for a in argv)
    sample = ("[11/22/2026-00:00:00] [I] Throughput: 812.5 qps\n"
              "[11/22/2026-00:00:00] [I] Latency: min = 1.10 ms, max = 2.31 ms, mean = 1.24 ms, median = 1.21 ms, "
              "percentile(90%) = 1.30 ms\n"
              "[11/22/2026-00:00:00] [I] GPU Compute Time: min = 1.01 ms, max = 2.02 ms, mean = 1.12 ms, "
              "median = 1.11 ms, percentile(99%) = 1.5 ms\n")
    figures = parse_trtexec(sample)
    assert figures["gpu_compute_ms"]["median"] == 1.11 and figures["latency_ms"]["mean"] == 1.24
    assert figures["throughput_qps"] == 812.5
    # The farm reads these hooks from the target's declared DeviceProfile, not from module attributes.
    profile = t.device_profile
    assert profile.required_providers == ("CUDAExecutionProvider",) and profile.provider_options is provider_options
    assert profile.trtexec.argv is trtexec_argv and profile.trtexec.parse is parse_trtexec
    assert "/usr/src/tensorrt/bin/trtexec" in profile.trtexec.commands and "onnxruntime-gpu" in profile.runtime_pip_hint
    assert get_target("rpi").device_profile.trtexec is None and not get_target("rpi").device_profile.ort_providers


TRTEXEC_SAMPLE = "[I] GPU Compute Time: min = 1.01 ms, max = 2.02 ms, mean = 1.12 ms, median = 1.11 ms\n"


def test_checks_are_functions_of_a_runs_results():
    """parity / budget / providers / trtexec judge what a device reported, with no device at hand."""
    from exporter.farm import Bundle
    from exporter.farm import checks as farm_checks
    from targets import get_target
    from targets.transports import Capabilities, Result, emulated_capabilities

    rpi, jetson = get_target("rpi"), get_target("jetson")
    fast = {"latency": {"decode_tok_s": 50.0, "ttft_ms": 100.0, "peak_rss_mb": 200.0}}
    assert farm_checks.budget(fast, rpi, {}, Capabilities()).status == "passed"
    missed = farm_checks.budget(fast, rpi, {"decode_tok_s_min": 1e9}, Capabilities())
    assert missed.status == "failed" and "missed the rpi budget" in missed.message
    emulated = farm_checks.budget(fast, rpi, {}, emulated_capabilities())
    assert emulated.status == "skipped" and "emulated: latency is not device latency" in emulated.message
    assert "pte" in emulated_capabilities().refused_formats and not Capabilities().refused_formats

    cpu_only = {"ort_providers": {"used": [["CPUExecutionProvider"]], "available": ["CPUExecutionProvider"]}}
    prov = farm_checks.providers(cpu_only, jetson.device_profile)
    assert prov.status == "failed" and "onnxruntime-gpu" in prov.message
    assert farm_checks.providers(cpu_only, rpi.device_profile).status == "passed"  # nothing required
    assert farm_checks.providers({}, jetson.device_profile) is None  # the run asked for no providers

    b = Bundle(path=Path("b"), manifest={"format": "onnx", "recipe": "fp16"},
               spec={"artifact": "model.onnx", "kind": "encoder"}, files={}, deploy_name="b-0")
    ran = []

    def device(argv):
        ran.append(argv)
        return Result(argv, 0, TRTEXEC_SAMPLE, "", 0.1)

    timed = farm_checks.trtexec(b, "d", {"trtexec": "/usr/bin/trtexec"}, jetson.device_profile, device)
    assert timed.status == "passed" and "1.110 ms" in timed.message and ran[0][:2] == [
        "/usr/bin/trtexec", "--onnx=d/bundle/model.onnx"]
    assert farm_checks.trtexec(b, "d", {}, jetson.device_profile, device).status == "skipped"
    assert farm_checks.trtexec(b, "d", {"trtexec": "t"}, rpi.device_profile, device) is None


def test_jetson_device_without_gpu_runtime_fails_the_providers_check(bundle, tmp_path):
    """A 'Jetson' whose onnxruntime is the CPU build (this machine): the run uses the requested EPs
    where available, reports what really ran, and fails the check naming onnxruntime-gpu; no trtexec -> skipped."""
    farm = load_farm(write_farm(tmp_path / "farm.toml", [
        {"name": "orin", "target": "jetson", "transport": "local", "python": sys.executable,
         "workdir": str(tmp_path / "home"), "decode_tokens": 8, "repeats": 2}]))
    report = run_farm(farm, [bundle])[0]
    c = checks(report)
    assert c["onnx/int8-dynamic run"].status == "passed"
    prov = c["onnx/int8-dynamic providers"]
    assert prov.status == "failed" and "CPUExecutionProvider" in prov.message and "onnxruntime-gpu" in prov.message
    assert prov.data["requested"][0] == "TensorrtExecutionProvider" and prov.data["used"] == [["CPUExecutionProvider"]]
    assert c["onnx/int8-dynamic trtexec"].status == "skipped"
    assert report.status == "failed"
    write_reports([report], farm, html_path=tmp_path / "r.html")
    assert "orin" in (tmp_path / "r.html").read_text()
