"""Deployment targets: each file in this package describes one kind of device and registers itself.

A target is data: which formats it can run, the default format and recipe for each, the latency /
memory budgets for the default model on that board (or per board profile), and which transport
reaches it. Adding a target is adding one file that calls ``register(Target(...))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from exporter.errors import SlmExportError
from exporter.registry import Registry


@dataclass(frozen=True)
class Budgets:
    """What the default model must reach on this target; ``None`` is not checked."""

    decode_tok_s_min: float | None = None
    ttft_ms_max: float | None = None
    peak_rss_mb_max: float | None = None
    flash_bytes_max: int | None = None
    ram_bytes_max: int | None = None

    def failures(self, figures: dict) -> list[str]:
        """Reasons the measured ``figures`` miss this budget (empty when within it).

        ``figures`` holds latency figures (``decode_tok_s``, ``ttft_ms``, ``peak_rss_mb``) and/or the
        memory an artifact needs (``flash_bytes``: what is stored on the part; ``arena_bytes``: the RAM
        TFLite Micro's tensor arena takes). A figure the run did not measure is not checked: an encoder
        has no decode speed or TTFT, a phone model no arena.
        """
        out = []
        checks = (("decode_tok_s", self.decode_tok_s_min, "decode {:.1f} tok/s < {:g}", lambda v, b: v < b),
                  ("ttft_ms", self.ttft_ms_max, "TTFT {:.0f} ms > {:g}", lambda v, b: v > b),
                  ("peak_rss_mb", self.peak_rss_mb_max, "peak RSS {:.0f} MB > {:g}", lambda v, b: v > b),
                  ("flash_bytes", self.flash_bytes_max, "flash {} bytes > budget {} bytes", lambda v, b: v > b),
                  ("arena_bytes", self.ram_bytes_max, "tensor arena {} bytes > budget {} bytes", lambda v, b: v > b))
        for key, bound, text, misses in checks:
            value = figures.get(key)
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
    # Recipes the target builds per format when fewer than the format's own (mcu: tflite int8-full only).
    recipes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Board profiles (name -> {"example": text, "budgets": Budgets}) for a target whose budget depends on
    # the part; the request picks one with extra["board"] (default ``default_board``).
    boards: dict[str, dict] = field(default_factory=dict)
    default_board: str | None = None
    # Module of the pipeline's stage hooks for a target whose model does not come from --model (the mcu
    # distils its own classifier), named rather than imported so listing targets does not import torch.
    stages: str | None = None
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

    def board_budgets(self, extra: dict) -> tuple[str | None, Budgets]:
        """(board profile, its budgets) for a request's ``extra``: ``board`` picks the profile, and a
        ``Budgets`` field in ``extra`` (e.g. ``ram_bytes_max``) overrides the profile's. A target
        without profiles has no board and its own budgets."""
        if not self.boards:
            return None, self.budgets
        board = extra.get("board") or self.default_board
        if board not in self.boards:
            raise SlmExportError(f"unknown board profile {board!r}", hint=f"known: {', '.join(self.boards)}")
        overrides = {f.name: extra[f.name] for f in dataclasses.fields(Budgets) if f.name in extra}
        return board, dataclasses.replace(self.boards[board]["budgets"], **overrides)


TARGETS: Registry[Target] = Registry("target", __name__)


def register(target: Target) -> Target:
    """Add ``target`` to the registry (called at import time by each target file)."""
    return TARGETS.register(target.name, target)


def get_target(name: str) -> Target:
    """The registered target called ``name`` (an error listing the targets when there is none)."""
    return TARGETS.get(name)
