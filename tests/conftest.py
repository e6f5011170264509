"""Shared fixtures: tiny model folders (built once per session) and a private model cache."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_model_dir  # noqa: E402

# A test run started in the background of a non-interactive shell (`.ci/run &`, nohup) has SIGINT ignored,
# and an ignored signal is inherited by every child: the Ctrl-C tests' exports and farms would never see it
# (measured: all 5 failed that way). A handled signal is reset to the default on exec, so handle it here.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function arch -> folder of a tiny random model of that architecture (cached per session)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_model_dir(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """A function arch -> LoadedModel of the tiny model, loaded through exporter.loading."""
    from exporter.loading import load_model

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(str(tiny_model_dir(arch)))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def farm_bundle(tiny_model_dir, tmp_path_factory):
    """One tiny rpi bundle (ONNX int8-dynamic) built with the real CLI, shared by the farm test modules."""
    from test_cli import run_cli

    out = tmp_path_factory.mktemp("farm-bundle") / "rpi"
    proc = run_cli("--target", "rpi", "--model", tiny_model_dir("llama"), "--out", out,
                   "--decode-tokens", "4", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# The real SmolLM2-135M bundles, each exported once per test session and shared by every test module that
# checks something in one (the export is minutes of CPU each; CI used to export the same rpi bundle three
# times and the same tflite bundle twice). Under pytest-xdist the workers share one folder, and a file
# lock makes the first worker export while the others wait for it.
REAL_SMOLLM2_BUNDLES = {
    # key -> CLI arguments (the embedded default, no --model)
    "rpi-onnx": ("--target", "rpi", "--decode-tokens", "16", "--repeats", "1"),
    "rpi-tflite": ("--target", "rpi", "--format", "tflite", "--decode-tokens", "8", "--repeats", "1"),
}


@pytest.fixture(scope="session")
def real_smollm2_bundle(tmp_path_factory, worker_id):
    """A function key -> folder of the real SmolLM2 bundle ``REAL_SMOLLM2_BUNDLES[key]`` (exported once).

    Tests must not change the folder: it is shared. The export's stderr is kept in ``<key>.log`` beside it
    so a failure reads the same from every test that asked for the bundle.
    """
    from filelock import FileLock
    from test_cli import run_cli

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # every xdist worker has its own basetemp under one shared parent
        root = root.parent
    root = root / "real-smollm2"
    root.mkdir(exist_ok=True)

    def get(key: str) -> Path:
        out, log = root / key, root / f"{key}.log"
        with FileLock(str(root / f"{key}.lock")):
            if not log.exists():
                proc = run_cli(*REAL_SMOLLM2_BUNDLES[key], "--out", out, timeout=3600)
                log.write_text(f"exit {proc.returncode}\n{proc.stderr}")
        text = log.read_text()
        assert text.startswith("exit 0\n"), f"slm-export {' '.join(REAL_SMOLLM2_BUNDLES[key])} failed:\n{text[-3000:]}"
        return out

    return get
