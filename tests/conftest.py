"""Shared fixtures: tiny model folders (built once per session) and a private model cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_model_dir  # noqa: E402


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
