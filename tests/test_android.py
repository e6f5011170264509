"""The android target and its adb transport.

Without a phone, the transport is exercised against a fake ``adb`` executable (a small Python script
written below) that answers ``devices -l``, ``push`` and ``shell`` on this machine, so the real
subprocess plumbing, timeouts, atomic push and output parsing run. The real-device test runs only
when ``adb devices`` lists a device and ``SLM_ANDROID_RUNNER`` names a llama_main binary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from exporter.errors import DeviceError, SlmExportError
from targets import get_target
from targets import adb as adbmod
from targets.android import ANDROID_SETTINGS, android_extras

FAKE_ADB = r'''#!{python}
import os, shutil, subprocess, sys, time
args = sys.argv[1:]
if args[:1] == ["-s"]:
    args = args[2:]
mode = os.environ.get("FAKE_ADB_MODE", "")
if args[:1] == ["devices"]:
    print("List of devices attached")
    for line in filter(None, os.environ.get("FAKE_ADB_DEVICES", "").split(";")):
        print(line)
    print()
    sys.exit(0)
if args[:1] == ["push"]:
    src, dst = args[1], args[2]
    if os.path.isdir(src):
        # adb semantics: an existing DEST directory receives DEST/<basename of SRC>.
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
        os.makedirs(dst)
        for i, name in enumerate(sorted(os.listdir(src))):
            if mode == "hang-push" and i == 1:   # the cable is pulled after the first file
                time.sleep(3600)
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    else:
        shutil.copy(src, dst)
    print("pushed")
    sys.exit(0)
if args[:1] == ["shell"]:
    # adb joins the shell arguments with spaces and gives them to the device's sh.
    sys.exit(subprocess.run(["sh", "-c", " ".join(args[1:])]).returncode)
sys.exit(1)
'''

# One PyTorchObserver line in the exact format of executorch/extension/llm/runner/stats.h.
OBSERVER = ('PyTorchObserver {"prompt_tokens":12,"generated_tokens":50,"model_load_start_ms":1000,'
            '"model_load_end_ms":1400,"inference_start_ms":2000,"inference_end_ms":4600,'
            '"prompt_eval_end_ms":2100,"first_token_ms":2120,"aggregate_sampling_time_ms":30,'
            '"SCALING_FACTOR_UNITS_PER_SECOND":1000}')


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """A fake adb on PATH; returns a function setting the attached devices and behaviour."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "adb"
    exe.write_text(FAKE_ADB.replace("{python}", sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")

    def configure(devices=("FAKE0001 device product:fake model:Pixel_Fake device:fake transport_id:1",), mode=""):
        monkeypatch.setenv("FAKE_ADB_DEVICES", ";".join(devices))
        monkeypatch.setenv("FAKE_ADB_MODE", mode)
        return str(exe)

    configure()
    return configure


def _bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle-smol"
    b.mkdir()
    (b / "model.pte").write_bytes(os.urandom(4096))
    (b / "tokenizer.json").write_text('{"model": {}}')
    (b / "runtime.json").write_text(json.dumps({"format": "pte", "artifact": "model.pte", "kind": "causal-lm"}))
    return b


def _fake_runner(tmp_path: Path) -> Path:
    """A stand-in for llama_main: checks its flags name real files, then prints runner stats."""
    r = tmp_path / "llama_main"
    r.write_text("#!/bin/sh\n"
                 'for a in "$@"; do case "$a" in --model_path=*) test -f "${a#*=}" || exit 3;; '
                 '--tokenizer_path=*) test -f "${a#*=}" || exit 4;; esac; done\n'
                 f"echo 'Once upon a time'\necho '{OBSERVER}'\n")
    r.chmod(0o755)
    return r


# ---------------------------------------------------------------- target and bundle extras


def test_android_target_is_registered():
    t = get_target("android")
    assert t.formats == ("pte", "tflite") and t.default_format == "pte"
    assert t.default_recipe("pte") == "int4-weight" and t.default_recipe("tflite") == "int8-dynamic"
    assert t.transport == "adb" and t.budgets.decode_tok_s_min


def test_android_extras_writes_demo_app_settings(tiny_loaded, tmp_path):
    import copy

    loaded = tiny_loaded("llama")
    tok = copy.deepcopy(loaded.tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fake = types.SimpleNamespace(tokenizer=tok, model=loaded.model, config=loaded.config)
    assert android_extras(fake, tmp_path, max_context=512) == [ANDROID_SETTINGS]
    s = json.loads((tmp_path / ANDROID_SETTINGS).read_text())
    assert s["model"] == "model.pte" and s["tokenizer"] == "tokenizer.json"
    assert s["system_prompt_template"] == "<|im_start|>system\n{{ system_prompt }}<|im_end|>\n"
    assert s["user_prompt_template"] == "<|im_start|>user\n{{ user_prompt }}<|im_end|>\n<|im_start|>assistant\n"
    assert s["eos_token_ids"] == [2] and s["generation"]["seq_len"] == 512 and s["generation"]["temperature"] == 0.0
    # The target's bundle hook writes it for a causal-LM .pte only (the demo app loads no .tflite).
    hook = get_target("android").bundle_extras
    hook(fake, tmp_path / "tfl", {"format": "tflite", "kind": "causal-lm", "artifact": "model.tflite"})
    assert not (tmp_path / "tfl" / ANDROID_SETTINGS).exists()
    hook(fake, tmp_path / "pte", {"format": "pte", "kind": "causal-lm", "artifact": "model.pte", "max_context": 256})
    assert json.loads((tmp_path / "pte" / ANDROID_SETTINGS).read_text())["generation"]["seq_len"] == 256


# ---------------------------------------------------------------- adb missing / no device


def test_adb_absent_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError) as err:
        adbmod.Adb()
    assert "adb is not installed" in err.value.message and "`adb`" in err.value.hint


def test_no_device_attached_says_so(fake_adb):
    fake_adb(devices=())
    with pytest.raises(DeviceError) as err:
        adbmod.Adb().select()
    assert err.value.message == "no Android device attached (adb devices lists none)"


def test_unauthorized_and_ambiguous_devices(fake_adb):
    fake_adb(devices=("R58M123 unauthorized usb:1-1 transport_id:2",))
    with pytest.raises(DeviceError, match="unauthorized"):
        adbmod.Adb().select()
    fake_adb(devices=("A1 device transport_id:1", "B2 device transport_id:2"))
    with pytest.raises(DeviceError, match="2 Android devices"):
        adbmod.Adb().select()
    assert adbmod.Adb(serial="B2").select().serial == "B2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _devices_on_private_server() -> list:
    """``adb devices`` through a private adb server (killed afterwards): nothing is left running."""
    port = str(_free_port())
    env_before = os.environ.get("ANDROID_ADB_SERVER_PORT")
    os.environ["ANDROID_ADB_SERVER_PORT"] = port
    try:
        return adbmod.Adb().devices()
    finally:
        subprocess.run([shutil.which("adb"), "-P", port, "kill-server"], capture_output=True, timeout=20)
        if env_before is None:
            os.environ.pop("ANDROID_ADB_SERVER_PORT", None)
        else:
            os.environ["ANDROID_ADB_SERVER_PORT"] = env_before


@pytest.mark.skipif(shutil.which("adb") is None, reason="adb is not installed (Debian package `adb`)")
def test_real_adb_without_device(monkeypatch):
    """The real adb binary: with no phone attached, select() says so plainly."""
    if any(d.ready for d in _devices_on_private_server()):
        pytest.skip("an Android device is attached; the no-device path cannot be shown")
    port = str(_free_port())
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", port)
    try:
        with pytest.raises(DeviceError, match=r"no Android device attached \(adb devices lists none\)"):
            adbmod.Adb().select()
    finally:
        subprocess.run([shutil.which("adb"), "-P", port, "kill-server"], capture_output=True, timeout=20)


# ---------------------------------------------------------------- runner binary checks


def test_runner_missing_or_not_executable(tmp_path):
    with pytest.raises(SlmExportError, match="no such file"):
        adbmod.check_runner_binary(tmp_path / "llama_main")
    f = tmp_path / "llama_main"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    with pytest.raises(SlmExportError, match="not executable") as err:
        adbmod.check_runner_binary(f)
    assert "chmod +x" in err.value.hint
    with pytest.raises(SlmExportError, match="not a file"):
        adbmod.check_runner_binary(tmp_path)


# ---------------------------------------------------------------- push, run, parse (fake device)


def test_push_is_atomic_and_run_parses_runner_stats(fake_adb, tmp_path):
    bundle = _bundle(tmp_path)
    device_root = tmp_path / "device" / "slm-export"
    result = adbmod.measure_on_device(bundle, _fake_runner(tmp_path), prompt="it's a \"quoted\" prompt; rm -rf /",
                                      repeats=2, device_root=str(device_root))
    deployed = device_root / bundle.name
    assert sorted(p.name for p in deployed.iterdir()) == ["model.pte", "runtime.json", "tokenizer.json"]
    assert (deployed / "model.pte").read_bytes() == (bundle / "model.pte").read_bytes()
    assert not [p for p in device_root.iterdir() if ".partial" in p.name]  # no staging dir left
    lat = result["latency"]
    assert lat["prompt_tokens"] == 12 and lat["decode_tokens"] == 50 and lat["repeats"] == 2
    assert lat["ttft_ms"] == pytest.approx(120.0)
    assert lat["prefill_tok_s"] == pytest.approx(12 / 0.1)
    assert lat["decode_tok_s"] == pytest.approx(50 / 2.5)
    assert lat["per_token_ms"]["p50"] == pytest.approx(50.0) and lat["load_s"] == pytest.approx(0.4)
    assert result["device"]["serial"] == "FAKE0001" and result["device"]["model"] == "Pixel_Fake"
    # Pushing again replaces the bundle in place.
    (bundle / "model.pte").write_bytes(b"new")
    adbmod.Adb().push_bundle(bundle, str(deployed))
    assert (deployed / "model.pte").read_bytes() == b"new"


def test_disconnect_mid_push_deploys_nothing(fake_adb, tmp_path):
    bundle = _bundle(tmp_path)
    deployed = tmp_path / "device" / "bundle-smol"
    adbmod.Adb().push_bundle(bundle, str(deployed))  # a previous, complete bundle
    before = {p.name: p.read_bytes() for p in deployed.iterdir()}
    (bundle / "model.pte").write_bytes(b"a newer model")
    fake_adb(mode="hang-push")
    with pytest.raises(DeviceError) as err:
        adbmod.Adb().push_bundle(bundle, str(deployed), timeout=2)
    assert "timed out" in err.value.message and "nothing was deployed" in err.value.message
    assert {p.name: p.read_bytes() for p in deployed.iterdir()} == before  # old bundle intact
    assert not [p for p in deployed.parent.iterdir() if ".partial" in p.name]


def test_runner_failure_is_reported_with_its_output(fake_adb, tmp_path):
    bad = tmp_path / "bad_main"
    bad.write_text("#!/bin/sh\necho 'E 00:00:00 Failed to load method forward' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(DeviceError) as err:
        adbmod.Adb().run_llm_runner(str(bad), "m.pte", "t.json", "hi", 32)
    assert "exited with code 1" in err.value.message and "Failed to load method" in err.value.hint


def test_parse_observer_stats_ignores_other_lines():
    out = "I 00:00:01 Resetting threadpool\nhello world\n" + OBSERVER + "\nI 00:00:05 done\n"
    stats = adbmod.parse_observer_stats(out)
    assert len(stats) == 1 and stats[0]["generated_tokens"] == 50
    assert adbmod.parse_observer_stats("no stats here") == []


# ---------------------------------------------------------------- a real phone


def _real_device_ready() -> str | None:
    if shutil.which("adb") is None:
        return "adb is not installed (Debian package `adb`)"
    try:
        devices = _devices_on_private_server()
    except DeviceError as e:
        return str(e)
    if not any(d.ready for d in devices):
        return "no Android device attached (adb devices lists none)"
    if not os.environ.get("SLM_ANDROID_RUNNER"):
        return "SLM_ANDROID_RUNNER (path of an arm64 llama_main) is not set"
    if not os.environ.get("SLM_ANDROID_BUNDLE"):
        return "SLM_ANDROID_BUNDLE (an android .pte bundle) is not set"
    return None


@pytest.mark.slow
def test_real_device_run():
    reason = _real_device_ready()
    if reason:
        pytest.skip(reason)
    result = adbmod.measure_on_device(Path(os.environ["SLM_ANDROID_BUNDLE"]), os.environ["SLM_ANDROID_RUNNER"],
                                      repeats=1, seq_len=64)
    assert result["latency"]["decode_tok_s"] > 0


def test_cli_device_android_runs_the_runner(fake_adb, tmp_path):
    """`slm-export device android BUNDLE --runner PATH` pushes, runs and reports the runner's figures."""
    from click.testing import CliRunner

    from exporter.cli import cli

    bundle = _bundle(tmp_path)
    out_json = tmp_path / "device.json"
    result = CliRunner().invoke(cli, ["device", "android", str(bundle), "--runner", str(_fake_runner(tmp_path)),
                                      "--repeats", "1", "--device-root", str(tmp_path / "device"), "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    assert "decode (tok/s)" in result.output
    assert json.loads(out_json.read_text())["latency"]["decode_tok_s"] == pytest.approx(20.0)
    missing = CliRunner().invoke(cli, ["device", "android", str(bundle), "--runner", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "runner" in missing.output and "Traceback" not in missing.output


@pytest.mark.slow
def test_export_with_runner_runs_on_the_phone_and_reports_it(fake_adb, tiny_model_dir, tmp_path):
    """`slm-export --target android --runner PATH`: the staged bundle is pushed and run before it is
    published; the device figures land in the manifest and report next to the host ones."""
    from exporter.pipeline import ExportRequest, run

    out = tmp_path / "smol-android"
    req = ExportRequest(target="android", out=out, model=str(tiny_model_dir("llama")), max_context=128,
                        decode_tokens=4, repeats=1, device_runner=str(_fake_runner(tmp_path)),
                        extra={"device_options": {"device_root": str(tmp_path / "device"), "repeats": 1}})
    manifest = run(req)
    assert manifest["device"]["latency"]["decode_tok_s"] == pytest.approx(20.0)
    assert manifest["device"]["device"]["serial"] == "FAKE0001"
    assert (tmp_path / "device" / "smol-android" / "model.pte").exists()  # pushed under the bundle's name
    assert "Latency on the device" in (out / "report.md").read_text()


def test_export_with_runner_fails_fast_without_a_phone(fake_adb, tiny_model_dir, tmp_path):
    from test_cli import run_cli

    fake_adb(devices=())
    runner = _fake_runner(tmp_path)
    proc = run_cli("--target", "android", "--model", tiny_model_dir("llama"), "--out", tmp_path / "o",
                   "--runner", runner, timeout=120)
    assert proc.returncode != 0 and "no Android device attached" in proc.stderr
    assert "pte:" not in proc.stderr  # refused before any export work
    assert not (tmp_path / "o").exists()
    proc = run_cli("--target", "rpi", "--model", tiny_model_dir("llama"), "--out", tmp_path / "o", "--runner", runner)
    assert proc.returncode != 0 and "--target android" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--target", "android", "--format", "tflite", "--model", tiny_model_dir("llama"),
                   "--out", tmp_path / "o", "--runner", runner)
    assert proc.returncode != 0 and "needs --format pte" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
