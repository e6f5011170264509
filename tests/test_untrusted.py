"""A bundle is untrusted input and a source model is never touched: one test per defect found by fuzzing.

Each malicious bundle is built here from a real tiny bundle, changed the way an attacker would (the
manifest re-sealed to match, since whoever writes a bundle writes its manifest too). Code-execution
tests assert that no file was created by the bundle's code. Every bad input must end in one clear
error line and a non-zero exit, with nothing lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_cli import ROOT, run_cli
from exporter import bundle as bundle_mod
from exporter.errors import ModelLoadError, SlmExportError
from exporter.runtime.base import RunnerError, open_runner
from exporter.runtime.files import BundleFileError, sha256_file
from exporter.runtime.spec import contract_fields


@pytest.fixture(scope="module")
def clean_bundle(tiny_model_dir, tmp_path_factory):
    """A tiny host ONNX fp32 bundle written by the real CLI (never modified: tests work on copies)."""
    out = tmp_path_factory.mktemp("untrusted") / "clean"
    proc = run_cli("--target", "host", "--format", "onnx", "--model", tiny_model_dir("llama"), "--out", out,
                   "--no-latency")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def reseal(folder: Path, extra: dict | None = None) -> None:
    """Rewrite the manifest's file table to match the folder, as the author of a malicious bundle would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel not in ("manifest.json", "report.md", "report.html"):
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    table.update(extra or {})
    manifest["files"] = table
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_spec(folder: Path, **changes) -> None:
    spec = json.loads((folder / "runtime.json").read_text())
    spec.update(changes)
    (folder / "runtime.json").write_text(json.dumps(spec))


def run_main(bundle: Path, *args, cwd: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "exporter.runtime.main", str(bundle), "--decode-tokens", "2",
                           "--repeats", "1", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or ROOT, env=env)


def one_error_line(proc) -> str:
    """The run failed with exactly one `error:` line and no traceback; returns that line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------- 1. a bundle never runs its own code


def _code_bundle(clean: Path, tmp_path: Path, module: str, marker: Path) -> Path:
    """A bundle that asks the .pte runner to import ``module`` as a kernel library, and ships that module."""
    evil = copy_bundle(clean, tmp_path / "bundle")
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('the bundle ran code')\n")
    layers = json.loads((evil / "runtime.json").read_text())["num_layers"]
    # A well-formed pte runtime.json (its tensor contract too), so only the kernel rule can refuse it.
    edit_spec(evil, format="pte", custom_ops=[module], **contract_fields("pte", "causal-lm", layers, 64))
    reseal(evil)
    return evil


@pytest.mark.parametrize("module, cwd", [("bundle.evil", "parent"), ("evil", "bundle")])
def test_bundle_cannot_load_its_own_code_as_kernels(clean_bundle, tmp_path, module, cwd):
    marker = tmp_path / "pwned"
    evil = _code_bundle(clean_bundle, tmp_path, module, marker)
    proc = run_main(evil, cwd=evil.parent if cwd == "parent" else evil)
    line = one_error_line(proc)
    assert "only ExecuTorch's own kernel libraries may be loaded" in line, line
    assert not marker.exists(), "the bundle's Python code ran"


def test_farm_device_does_not_run_bundle_code(clean_bundle, tmp_path):
    """The farm puts the deployment folder on the device's sys.path: the bundle's module must still not run."""
    from test_farm import write_farm

    marker = tmp_path / "pwned"
    evil = _code_bundle(clean_bundle, tmp_path, "bundle.evil", marker)
    farm = write_farm(tmp_path / "farm.toml", [{"name": "here", "target": "host", "transport": "local",
                                                "python": sys.executable, "workdir": str(tmp_path / "home")}],
                      defaults={"decode_tokens": 2, "repeats": 1})
    proc = run_cli("farm", "run", farm, "--bundle", evil, "--json", tmp_path / "r.json", timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    run = json.loads((tmp_path / "r.json").read_text())["devices"][0]["runs"][0]
    messages = " ".join(c["message"] for c in run["checks"])
    assert "only ExecuTorch's own kernel libraries" in messages, messages
    assert not marker.exists(), "the bundle's Python code ran on the device"


# ---------------------------------------------------------------- 2. --force never touches the model


def test_force_never_replaces_the_model_or_its_parent(tiny_model_dir, tmp_path):
    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_model_dir("llama"), model)
    for out in (model, model.parent):
        proc = run_cli("--target", "host", "--model", model, "--out", out, "--force", "--no-latency")
        line = one_error_line(proc)
        assert "would replace it" in line, line
        assert (model / "model.safetensors").exists() and (model / "config.json").exists()


def test_force_replaces_only_a_bundle(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    proc = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", notes, "--force")
    assert "not a slm-export bundle" in one_error_line(proc)
    assert (notes / "thesis.txt").read_text() == "years of work"


# ---------------------------------------------------------------- 3. weights must cover the config


@pytest.mark.parametrize("layers, word", [(3, "missing"), (1, "not in the model")])
def test_weights_that_do_not_match_the_config_are_refused(tiny_model_dir, tmp_path, layers, word):
    from exporter.loading import load_model

    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=word) as err:
        load_model(str(model))
    assert "do not match its config.json" in str(err.value)


# ---------------------------------------------------------------- 4. the file that runs is the file verified


@pytest.mark.parametrize("artifact", ["../clean/model.onnx", "/etc/hostname", "sub/../model.onnx"])
def test_artifact_path_may_not_leave_the_bundle(clean_bundle, tmp_path, artifact):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    edit_spec(evil, artifact=artifact)
    reseal(evil)
    with pytest.raises(RunnerError, match="leaves the bundle"):
        open_runner(evil)
    assert "leaves the bundle" in one_error_line(run_main(evil))


def test_runner_checks_sha256_before_loading(clean_bundle, tmp_path):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    model = evil / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes: only the hash can tell
    model.write_bytes(bytes(data))
    with pytest.raises(RunnerError, match="model.onnx: sha256 differs"):
        open_runner(evil)
    (evil / "manifest.json").unlink()
    with pytest.raises(RunnerError, match="cannot be verified"):
        open_runner(evil)


def test_web_server_serves_only_the_verified_bundle_to_its_own_host(clean_bundle, tmp_path):
    import http.client

    from examples.predictive_text.web import server

    if not (server.ORT_DIST / "ort.wasm.min.mjs").exists():
        pytest.skip("onnxruntime-web is not installed (npm ci --prefix examples/predictive_text/web)")
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    edit_spec(evil, artifact="../../../../etc/passwd")
    reseal(evil)
    with pytest.raises(SlmExportError, match="leaves the bundle"):
        server.serve(evil, port=0, quiet=True)
    httpd = server.serve(clean_bundle, port=0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        def get(path, host):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return resp.status, body

        status, body = get("/bundle/model.onnx", f"127.0.0.1:{port}")
        assert status == 200 and body == (clean_bundle / "model.onnx").read_bytes()
        assert get("/bundle/model.onnx", f"evil.example:{port}")[0] == 421  # DNS rebinding
        assert get("/bundle/../manifest.json", f"localhost:{port}")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------- 5, 6. symlinks, special files, manifest paths


def test_symlinks_in_a_bundle_are_refused_everywhere(clean_bundle, tmp_path):
    from exporter.farm import load_bundle

    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    (evil / "notes.txt").symlink_to(secret)
    reseal(evil, {"notes.txt": {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}})
    with pytest.raises(SlmExportError, match="symlink"):
        load_bundle(evil, tmp_path / "rt")
    with pytest.raises(RunnerError, match="symlink"):
        open_runner(evil)
    (evil / "notes.txt").unlink()
    (evil / "model.onnx").rename(tmp_path / "real.onnx")
    (evil / "model.onnx").symlink_to(tmp_path / "real.onnx")
    reseal(evil, {"model.onnx": {"sha256": sha256_file(tmp_path / "real.onnx"),
                                 "bytes": (tmp_path / "real.onnx").stat().st_size}})
    with pytest.raises(RunnerError, match="symlink"):
        open_runner(evil)


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "../../dev/zero"])
def test_manifest_paths_may_not_leave_the_bundle(clean_bundle, tmp_path, entry):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    reseal(evil, {entry: {"sha256": "0" * 64, "bytes": 10}})
    t0 = time.perf_counter()
    with pytest.raises(SlmExportError, match="leaves the bundle"):
        bundle_mod.verify(evil)
    assert time.perf_counter() - t0 < 10  # /dev/zero is never read


def test_special_files_and_undeclared_files_are_refused(clean_bundle, tmp_path):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    os.mkfifo(evil / "pipe")
    with pytest.raises(SlmExportError, match="not a regular file"):
        bundle_mod.verify(evil)
    (evil / "pipe").unlink()
    (evil / "extra.py").write_text("print('hi')\n")
    assert bundle_mod.verify(evil) == ["extra.py: not listed in manifest.json"]


# ---------------------------------------------------------------- 7. bounded calibration input


def test_calibration_from_a_device_or_fifo_is_refused_at_once(tiny_model_dir, tmp_path):
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        t0 = time.perf_counter()
        proc = run_cli("--target", "host", "--format", "onnx", "--recipe", "int8-static", "--model",
                       tiny_model_dir("llama"), "--out", tmp_path / "o", "--calibration", path, timeout=120)
        assert "not a regular file" in one_error_line(proc)
        assert time.perf_counter() - t0 < 60 and not (tmp_path / "o").exists()


def test_a_huge_calibration_file_is_read_up_to_its_bound(tmp_path):
    from exporter.texts import CALIBRATION_MAX_BYTES, calibration_texts

    big = tmp_path / "big.txt"
    line = "It is a truth universally acknowledged that a single man in possession of a good fortune.\n"
    with open(big, "w") as f:
        f.write(line * (3 * CALIBRATION_MAX_BYTES // len(line)))
    said = []
    texts = calibration_texts(big, said.append)
    assert sum(len(t) for t in texts) <= CALIBRATION_MAX_BYTES
    assert said and "using the first 4 MB" in said[0]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(SlmExportError, match="not UTF-8"):
        calibration_texts(tmp_path / "bad.txt")


# ---------------------------------------------------------------- 10. one export per --out at a time


@pytest.mark.slow
def test_second_export_to_the_same_out_fails_at_once(tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "exporter.cli", "--target", "host", "--model",
                              str(tiny_model_dir("llama")), "--out", str(out), "--no-latency"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".b.lock").exists():
            assert first.poll() is None and time.time() < deadline, "the first export never took its lock"
            time.sleep(0.2)
        second = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", out, "--force")
        assert f"is writing {out}" in one_error_line(second)
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert bundle_mod.verify(out) == [] and not (tmp_path / ".b.lock").exists()


# ---------------------------------------------------------------- 11. the smaller ones


@pytest.mark.parametrize("content, message", [("{", "not valid JSON"), ("[]", "not a JSON object"),
                                              ('{"format": "onnx"}', "has no 'artifact'"),
                                              ('{"format": "../x", "artifact": "a"}', "not a format name")])
def test_malformed_runtime_json_is_one_error_line(clean_bundle, tmp_path, content, message):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    (evil / "runtime.json").write_text(content)
    reseal(evil)
    assert message in one_error_line(run_main(evil))
    as_json = run_main(evil, "--json")
    assert message in json.loads(as_json.stdout.strip().splitlines()[-1])["error"]


@pytest.mark.parametrize("change, message", [
    ({"contract": 99}, "contract version 99"),
    ({"inputs": ["input_ids", "attention_mask"]}, "inputs names 2 tensors"),
    ({"outputs": [{"name": "logits"}]}, "not a plain tensor name"),
    ({"cache": {"inputs": ["past:1x1,evil"], "outputs": [], "layout": ["batch", "kv_heads", "seq", "head_dim"],
                "max_context": None}}, "not a plain tensor name"),
    ({"cache": None}, "needs a cache object"),
    ({"cache": {"inputs": [], "outputs": [], "layout": ["seq"], "max_context": None}}, "cache layout"),
])
def test_malformed_tensor_contract_is_one_error_line(clean_bundle, tmp_path, change, message):
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    spec = json.loads((evil / "runtime.json").read_text())
    (evil / "runtime.json").write_text(json.dumps({**spec, **change}))
    reseal(evil)
    assert message in one_error_line(run_main(evil))


def test_interrupt_during_publish_keeps_one_whole_bundle(tmp_path, monkeypatch):
    out, staging = tmp_path / "b", tmp_path / ".b.partial-x"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    real_replace = os.replace

    def replace_then_interrupt(a, b):
        real_replace(a, b)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right between the two renames

    monkeypatch.setattr(bundle_mod.os, "replace", replace_then_interrupt)
    with pytest.raises(bundle_mod.InterruptedAfterPublish, match="already written"):
        bundle_mod.publish(staging, out)
    assert (out / "new.txt").read_text() == "new" and not list(tmp_path.glob(".b.old-*"))


@pytest.mark.slow
def test_leftovers_are_swept_and_bundle_published_with_the_usual_mode(tiny_model_dir, tmp_path):
    stale = tmp_path / ".b.partial-12345-abcd"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    proc = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", tmp_path / "b", "--no-latency")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed 1 unfinished staging folder" in proc.stderr and not stale.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_failed_run_leaves_no_parent_folders(tmp_path):
    proc = run_cli("--target", "host", "--model", tmp_path / "no-such-model", "--out", tmp_path / "a" / "b" / "c")
    assert "does not exist" in one_error_line(proc)
    assert not (tmp_path / "a").exists()


def test_out_that_is_not_utf8_is_refused(tiny_model_dir, tmp_path):
    out = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    proc = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", out)
    assert "not a valid UTF-8 name" in one_error_line(proc)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_full_disk_is_one_clear_error(tiny_model_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = run_cli("--target", "host", "--model", tiny_model_dir("llama"), "--out", disk / "b", "--no-latency")
        assert "no space left on the device" in one_error_line(proc)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_chat_template_has_a_cpu_bound(tmp_path):
    from examples.common.bundle import Bundle

    b = Bundle(path=tmp_path, spec={}, runner=None, tokenizer=None, eos_ids=[], context=64,
               chat_template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x")
    t0 = time.perf_counter()
    with pytest.raises(SlmExportError, match="ran longer than"):
        b.render_chat([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 15


def test_tokenizer_errors_name_the_file(tiny_model_dir, clean_bundle, tmp_path):
    from examples.common.bundle import open_bundle
    from exporter.loading import load_model

    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_model(str(model))
    evil = copy_bundle(clean_bundle, tmp_path / "b")
    (evil / "tokenizer.json").write_text("{not json")
    reseal(evil)
    with pytest.raises(SlmExportError, match=r"tokenizer .*tokenizer\.json"):
        open_bundle(evil)


def test_bundle_file_rules_refuse_each_bad_path(tmp_path):
    """The path rule itself, on the forms a bundle could use to leave its folder."""
    from exporter.runtime.files import bundle_path

    (tmp_path / "ok.txt").write_text("x")
    assert bundle_path(tmp_path, "ok.txt") == tmp_path / "ok.txt"
    for bad in ("", "/abs", "../x", "a/../ok.txt", "./ok.txt", "a//b", "a\\b", "x\x00y", 3, None):
        with pytest.raises(BundleFileError):
            bundle_path(tmp_path, bad)
