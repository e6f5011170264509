"""slm-export sweep: a matrix of tiny models exported in the local pool and on a local Ray cluster.

Every export here is a real one (tiny random llama and qwen2 models, ONNX fp32 / int8-dynamic, 4 decode
tokens of latency), checked against a serial run of the same cells through ``pipeline.run``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import ROOT, run_cli

ARCHS = ("llama", "qwen2")
RECIPES = ("fp32", "int8-dynamic")
OPTIONS = "[options]\ndecode_tokens = 4\nrepeats = 1\n"


def sweep_file(folder: Path, models, targets=("host",), formats=("onnx",), recipes=RECIPES, extra: str = "",
               options: str = OPTIONS) -> Path:
    """A SWEEP.toml in ``folder``: ``models`` {name: folder} as [[model]] tables."""
    def toml_list(items):
        return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"

    tables = "".join(f"[[model]]\nname = {json.dumps(n)}\npath = {json.dumps(str(p))}\n" for n, p in models.items())
    path = folder / "SWEEP.toml"
    path.write_text(f"targets = {toml_list(targets)}\nformats = {toml_list(formats)}\n"
                    f"recipes = {toml_list(recipes)}\nmemory_gb_per_cell = 1\n{extra}{tables}{options}")
    return path


def cell_names(models=ARCHS, target="host", fmt="onnx", recipes=RECIPES) -> list[str]:
    return [f"{m}-{target}-{fmt}-{r}" for m in models for r in recipes]


def parity_of(folder: Path) -> dict:
    """The parity figures of a bundle's manifest (what must not depend on how the sweep ran)."""
    return json.loads((folder / "manifest.json").read_text())["parity"]


def leftovers(out: Path) -> list[str]:
    """Staging folders, moved-aside bundles or locks of an export left in ``out``."""
    return sorted(p.name for p in out.iterdir() if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {a: tiny_model_dir(a) for a in ARCHS}


@pytest.fixture(scope="module")
def serial(models, tmp_path_factory):
    """The same cells as the sweeps, exported one after another with ``pipeline.run`` in this process."""
    from exporter.pipeline import ExportRequest, run

    root = tmp_path_factory.mktemp("serial")
    start = time.perf_counter()
    for arch, model in models.items():
        for recipe in RECIPES:
            run(ExportRequest(target="host", out=root / f"{arch}-host-onnx-{recipe}", model=str(model), format="onnx",
                              recipe=recipe, decode_tokens=4, repeats=1))
    return root, time.perf_counter() - start


@pytest.fixture(scope="module")
def pool_sweep(models, tmp_path_factory):
    """The 4-cell sweep (2 tiny models x host x onnx x fp32, int8-dynamic) in the local pool of 2 workers."""
    folder = tmp_path_factory.mktemp("pool")
    out = folder / "out"
    start = time.perf_counter()
    proc = run_cli("sweep", sweep_file(folder, models), "--out", out, "--jobs", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, time.perf_counter() - start


def test_pool_sweep_equals_a_serial_run(pool_sweep, serial):
    out, proc, _ = pool_sweep
    serial_root, _ = serial
    summary = json.loads((out / "summary.json").read_text())
    assert [c["cell"] for c in summary["cells"]] == cell_names()
    assert {c["status"] for c in summary["cells"]} == {"ok"}
    assert summary["backend"] == "local pool" and summary["workers"] == 2
    assert len({c["pid"] for c in summary["cells"]}) == 2  # both workers exported
    from exporter.bundle import verify

    for name in cell_names():
        assert verify(out / name) == [], name
        assert parity_of(out / name) == parity_of(serial_root / name), name
        cell = next(c for c in summary["cells"] if c["cell"] == name)
        assert cell["figures"]["parity"] == parity_of(serial_root / name)["metrics"]
        assert cell["figures"]["decode_tok_s"] > 0 and cell["figures"]["bytes"] > 0
    assert leftovers(out) == []
    # The terminal's table and the page: one row per cell with its figures.
    for name in cell_names():
        assert name in proc.stdout and name in (out / "summary.html").read_text()
    for col in ("status", "size", "top-1", "ppl change", "decode tok/s", "time"):
        assert col in proc.stdout
    assert "4/4 done, 0 running, 0 failed" in proc.stderr  # progress into a log: one line per event
    assert "ETA" in proc.stderr
    assert (out / "logs" / f"{cell_names()[0]}.log").read_text().count("export: ONNX graph") == 1


def test_impossible_cell_refused_before_any_work(models, tmp_path):
    """android cannot run onnx: both models' android cells are listed in one error and nothing is created."""
    out = tmp_path / "out"
    proc = run_cli("sweep", sweep_file(tmp_path, models, targets=("host", "android")), "--out", out, timeout=120)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "4 of 8 cells" in errors[0] and "impossible" in errors[0], proc.stderr
    for name in (*cell_names(target="android"),):
        assert f"  {name}: target 'android' does not run format 'onnx'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("text, message", [
    ("models = ['{m}']\ntargets = ['host']\nrecipe = ['fp32']\n", "unknown key 'recipe'"),
    ("models = ['{m}', 'no/such/model']\ntargets = ['host']\n", "model path(s) not found: no/such/model"),
    ("models = ['{m}']\ntargets = ['pi']\n", "unknown target 'pi'"),
    ("models = ['{m}']\ntargets = ['host']\n[options]\nno_latncy = true\n", "unknown option 'no_latncy'"),
    ("models = ['{m}']\ntargets = ['host'\n", "not valid TOML"),
])
def test_bad_sweep_file_is_one_error(models, tmp_path, text, message):
    path = tmp_path / "SWEEP.toml"
    path.write_text(text.replace("{m}", str(models["llama"])))
    proc = run_cli("sweep", path, "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_resume_skips_verified_bundles_and_redoes_a_tampered_one(pool_sweep, models, tmp_path):
    """--resume keeps the 3 intact bundles (not re-exported), replaces the tampered one; --skip-impossible
    lists the android cells and runs the rest."""
    out = tmp_path / "out"
    shutil.copytree(pool_sweep[0], out)
    tampered = cell_names()[1]
    runtime = out / tampered / "runtime.json"
    runtime.write_text(runtime.read_text().replace("{", "{ ", 1))
    before = {n: (out / n / "manifest.json").stat().st_mtime_ns for n in cell_names()}
    sweep = sweep_file(tmp_path, models, targets=("host", "android"))
    refused = run_cli("sweep", sweep, "--out", out, "--skip-impossible", timeout=120)  # without --resume: refused
    assert refused.returncode == 1 and "already holds 4 of the sweep's bundles" in refused.stderr
    proc = run_cli("sweep", sweep, "--out", out, "--resume", "--skip-impossible", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = {c["cell"]: c for c in json.loads((out / "summary.json").read_text())["cells"]}
    assert {n: summary[n]["status"] for n in cell_names()} == {n: "ok" if n == tampered else "skipped-resume"
                                                              for n in cell_names()}
    assert {summary[n]["status"] for n in cell_names(target="android")} == {"impossible"}
    after = {n: (out / n / "manifest.json").stat().st_mtime_ns for n in cell_names()}
    assert [n for n in cell_names() if after[n] != before[n]] == [tampered]
    from exporter.bundle import verify

    assert all(verify(out / n) == [] for n in cell_names()) and leftovers(out) == []
    assert f"redoing 1 bundle(s) that do not verify: {tampered}" in proc.stderr


def _start_sweep(args, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "exporter.cli", "sweep", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_staging(out: Path, name: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The staging folder of cell ``name`` once its export has started writing (the pid is in its name)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(out.glob(f".{name}.partial-*")) if out.exists() else []
        if found and any(found[0].iterdir()):
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no staging folder for {name} within {timeout} s")


def test_killed_worker_leaves_nothing_half_written_and_its_cell_is_retried(models, tmp_path):
    out = tmp_path / "out"
    name = cell_names(models=ARCHS[:1], recipes=("fp32",))[0]
    proc = _start_sweep([sweep_file(tmp_path, {"llama": models["llama"]}, recipes=("fp32",)), "--out", out], tmp_path)
    try:
        staging = _wait_for_staging(out, name, proc)
        worker = int(staging.name.split(".partial-")[1].split("-")[0])
        os.kill(worker, signal.SIGKILL)  # the worker process dies mid-export (as the OOM killer would)
        assert not (out / name).exists()  # only the staging folder was there, never a half bundle
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "its worker died; running it again" in stderr
    cell = json.loads((out / "summary.json").read_text())["cells"][0]
    assert (cell["status"], cell["attempts"]) == ("ok", 2) and cell["pid"] != worker
    from exporter.bundle import verify

    assert verify(out / name) == [] and leftovers(out) == []


def test_ctrl_c_cancels_cleanly(models, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) mid-export: exit 130, no bundle, no staging folder,
    the summary says which cells were cancelled."""
    out = tmp_path / "out"
    names = cell_names()
    proc = _start_sweep([sweep_file(tmp_path, models), "--out", out, "--jobs", "1"], tmp_path)
    try:
        _wait_for_staging(out, names[0], proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: 0 of 4 cells finished" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.iterdir() if not p.name.startswith(("summary.", "logs"))] == []
    summary = json.loads((out / "summary.json").read_text())
    assert {c["status"] for c in summary["cells"]} == {"cancelled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_error(models, tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = run_cli("sweep", sweep_file(tmp_path, models), "--out", out, "--ray", f"127.0.0.1:{_free_port()}", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in errors[0], proc.stderr
    assert not out.exists() and time.perf_counter() - start < 60


def test_ray_not_installed_says_how_to_install(models, tmp_path):
    shadow = tmp_path / "no-ray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "sweep", sweep_file(tmp_path, models), "--out",
                           tmp_path / "out", "--ray", "auto"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "--ray needs Ray" in errors[0]
    assert "pip install 'slm-export[cluster]'" in proc.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on loopback, started by this test module and shut down after it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 ** 2,
                   _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.mark.slow  # a Ray cluster's start-up and 4 exports in Ray workers: about a minute
def test_ray_sweep_equals_the_local_pool(ray_cluster, pool_sweep, models, tmp_path):
    pool_out, _, pool_s = pool_sweep
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = run_cli("sweep", sweep_file(tmp_path, models), "--out", out, "--ray", ray_cluster, timeout=900)
    ray_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "Ray" and {c["status"] for c in summary["cells"]} == {"ok"}
    assert f"Ray cluster at {ray_cluster}: 1 node(s), 2 CPUs" in proc.stderr
    from exporter.bundle import verify

    for name in cell_names():
        assert verify(out / name) == [], name
        assert parity_of(out / name) == parity_of(pool_out / name), name
    assert leftovers(out) == []
    print(f"\nsweep of {len(cell_names())} cells: local pool {pool_s:.1f} s, Ray {ray_s:.1f} s (wall, CLI included)")
