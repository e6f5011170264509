"""Deployment targets: each file in this package describes one kind of device and registers itself.

A target is data: which formats it can run, the default format and recipe for each, the latency /
memory budgets for the default model on that board, and which transport reaches it. Adding a target
is adding one file that calls ``register(Target(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from exporter.registry import Registry


@dataclass(frozen=True)
class Budgets:
    """What the default model must reach on this target; ``None`` is not checked."""

    decode_tok_s_min: float | None = None
    ttft_ms_max: float | None = None
    peak_rss_mb_max: float | None = None
    flash_bytes_max: int | None = None
    ram_bytes_max: int | None = None

    def failures(self, latency: dict) -> list[str]:
        """Reasons the measured ``latency`` figures miss this budget (empty when within it).

        A figure the run did not measure is not checked: an encoder has no decode speed or TTFT.
        """
        out = []
        checks = (("decode_tok_s", self.decode_tok_s_min, "decode {:.1f} tok/s < {:g}", lambda v, b: v < b),
                  ("ttft_ms", self.ttft_ms_max, "TTFT {:.0f} ms > {:g}", lambda v, b: v > b),
                  ("peak_rss_mb", self.peak_rss_mb_max, "peak RSS {:.0f} MB > {:g}", lambda v, b: v > b))
        for key, bound, text, misses in checks:
            value = latency.get(key)
            if bound is not None and isinstance(value, (int, float)) and misses(value, bound):
                out.append(text.format(value, bound))
        return out


@dataclass(frozen=True)
class Trtexec:
    """How the device farm times a bundle's ``.onnx`` with NVIDIA's ``trtexec`` on a target's devices."""

    commands: tuple[str, ...]  # names or paths the device probe looks for; the first found is run
    # (tool, onnx path on the device, runtime spec, prompt tokens) -> the argv timing one decode step
    argv: Callable[[str, str, dict, int], list[str]]
    parse: Callable[[str], dict]  # trtexec's output -> figures ({"gpu_compute_ms": {"median": ...}, ...})


@dataclass(frozen=True)
class DeviceProfile:
    """What the device farm does differently on a target's devices; the defaults change nothing.

    ONNX bundles run with ``ort_providers`` (in priority order; a farm device may override them),
    and a run must really have used every one of ``required_providers`` (else the device has the
    wrong onnxruntime build, and ``runtime_pip_hint`` says which to install).
    """

    ort_providers: tuple[str, ...] = ()
    required_providers: tuple[str, ...] = ()
    # (runtime spec, a cache folder beside the deployed bundle) -> {provider: {option: value}}
    provider_options: Callable[[dict, str], dict] | None = None
    provider_cache_dir: str = "trt_cache"  # that folder's name
    runtime_pip_hint: str | None = None  # how to install the ONNX runtime this target needs
    trtexec: Trtexec | None = None


@dataclass(frozen=True)
class Target:
    """A kind of device: its formats (first is the default), default recipe per format, budgets."""

    name: str
    description: str
    formats: tuple[str, ...]
    default_recipes: dict[str, str]  # format -> recipe used when --recipe is not given
    transport: str = "local"  # local | ssh | adb
    budgets: Budgets = field(default_factory=Budgets)
    # Optional hook (loaded, staging_dir, runtime_spec) -> None that adds files an app on this
    # target expects beside the artifact (e.g. the ExecuTorch Android demo app's JSON).
    bundle_extras: Callable | None = None
    # Optional hook (ExportRequest, progress) -> manifest for targets whose flow differs from
    # load -> export -> ... (the microcontroller target distils its own small model first).
    custom_pipeline: Callable | None = None
    # Optional hooks for `--runner`: on_device_precheck(runner, serial, format) fails fast (before the slow
    # export) when the device or runner is missing; on_device(bundle_dir, runner, serial, name,
    # **options) -> dict runs the staged bundle on the attached device and returns its figures.
    on_device_precheck: Callable | None = None
    on_device: Callable | None = None
    # What the device farm does differently on this target (execution providers, trtexec timing).
    device_profile: DeviceProfile = field(default_factory=DeviceProfile)

    @property
    def default_format(self) -> str:
        return self.formats[0]

    def default_recipe(self, fmt: str) -> str:
        return self.default_recipes.get(fmt, "fp32")


TARGETS: Registry[Target] = Registry("target", __name__)


def register(target: Target) -> Target:
    """Add ``target`` to the registry (called at import time by each target file)."""
    return TARGETS.register(target.name, target)


def get_target(name: str) -> Target:
    """The registered target called ``name`` (an error listing the targets when there is none)."""
    return TARGETS.get(name)
