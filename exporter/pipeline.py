"""The export pipeline: load -> export -> quantize -> validate -> measure -> bundle.

``run`` is what ``slm-export --target ...`` calls; each stage reports progress through a callback so the
CLI can show it, and everything is written in a staging folder that is published only when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import bundle, latency, parity, report
from .errors import ParityGateFailed, SlmExportError, UnsupportedRecipeError
from .formats import ExportOptions, get_format
from .loading import load_model
from .recipes import get_recipe
from .runtime import RUNTIME_SPEC, open_runner
from .texts import calibration_texts, eval_text
from targets import get_target

LATENCY_PROMPT_TOKENS = 64
DEFAULT_MAX_CONTEXT = 512


@dataclass
class ExportRequest:
    """Everything the user chose on the command line."""

    target: str
    out: Path
    model: str | None = None
    format: str | None = None
    recipe: str | None = None
    force: bool = False
    gate: bool = True
    measure: bool = True
    calibration: Path | None = None
    cache_dir: Path | None = None
    trust_pickle: bool = False
    max_context: int | None = None  # None: min(DEFAULT_MAX_CONTEXT, the model's positions)
    group_size: int = 32
    prefill_lengths: tuple[int, ...] = (32, 128)
    decode_tokens: int = 64
    repeats: int = 3
    threads: int | None = None
    greedy_tokens: int = 32
    device_runner: str | None = None  # --runner: also run the bundle on an attached device
    device_serial: str | None = None
    extra: dict = field(default_factory=dict)


def resolve(req: ExportRequest) -> tuple:
    """The target, format and recipe to use; refuses a combination the format or target cannot do."""
    target = get_target(req.target)
    fmt_name = req.format or target.default_format
    if fmt_name not in target.formats:
        raise UnsupportedRecipeError(f"target {target.name!r} does not run format {fmt_name!r}",
                                     hint=f"{target.name} formats: {', '.join(target.formats)}")
    fmt = get_format(fmt_name)
    recipe = req.recipe or target.default_recipe(fmt_name)
    get_recipe(recipe)
    if recipe not in fmt.recipes:
        raise UnsupportedRecipeError(f"format {fmt_name!r} cannot do recipe {recipe!r}",
                                     hint=f"{fmt_name} recipes: {', '.join(fmt.recipes)}")
    return target, fmt, recipe


def run(req: ExportRequest, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Export, check and measure; publish the bundle at ``req.out``; return its manifest."""
    target = get_target(req.target)
    if target.custom_pipeline is not None:
        return target.custom_pipeline(req, progress)
    target, fmt, recipe = resolve(req)
    bundle.check_out_dir(req.out, req.force, protected_paths(req))
    if req.device_runner:
        _precheck_device(target, fmt.name, req)
    calib = calibration_texts(req.calibration, progress) if get_recipe(recipe).calibrated else []
    with bundle.writing(req.out, req.force, protected_paths(req), progress) as staging:
        t0 = time.perf_counter()
        progress(f"load: {req.model or 'embedded default smollm2-135m-instruct'}")
        loaded = load_model(req.model, cache_dir=req.cache_dir, trust_pickle=req.trust_pickle)
        fmt.check(loaded.kind, recipe, loaded.family)
        timings = {"load_s": time.perf_counter() - t0}

        t0 = time.perf_counter()
        max_context, context_note = fit_context(loaded, req.max_context)
        if context_note:
            progress(context_note)
        options = ExportOptions(max_context=max_context, group_size=req.group_size,
                                prefill_lengths=req.prefill_lengths,
                                calibration_texts=calib, progress=progress)
        artifact = fmt.build(loaded, recipe, options, staging)
        timings["export_s"] = time.perf_counter() - t0
        if context_note:
            artifact.notes.append(context_note)
        spec = dict(artifact.spec)
        spec["latency_prompt_ids"] = loaded.tokenizer(" ".join(eval_text().split()),
                                                      add_special_tokens=False)["input_ids"][:LATENCY_PROMPT_TOKENS]
        (staging / RUNTIME_SPEC).write_text(json.dumps(spec, indent=2))
        parity.write_reference(loaded, staging / parity.REFERENCE_FILE, spec.get("eos_token_ids", []))
        tokenizer_files = bundle.copy_tokenizer_files(loaded.folder, staging)
        if target.bundle_extras:
            target.bundle_extras(loaded, staging, spec)

        t0 = time.perf_counter()
        progress("validate: parity against PyTorch")
        runner = open_runner(staging, spec, verify_files=False)  # written by this run, moments ago
        parity_result = parity.evaluate(loaded, runner, recipe, greedy_tokens=req.greedy_tokens, progress=progress)
        del runner
        timings["parity_s"] = time.perf_counter() - t0
        if not parity_result["passed"] and req.gate:
            raise ParityGateFailed(
                f"parity gate failed for {fmt.name} / {recipe}:\n" + _parity_table(parity_result),
                hint="nothing was written; pass --no-gate to keep the artifact anyway",
            )

        latency_result = None
        if req.measure:
            t0 = time.perf_counter()
            progress(f"measure: latency on this machine ({req.repeats} repeats, {req.decode_tokens} decode tokens)")
            latency_result = latency.measure_on_host(staging, req.decode_tokens, req.repeats, threads=req.threads,
                                                     verify_files=False)
            timings["measure_s"] = time.perf_counter() - t0

        device_result = None
        if req.device_runner:
            t0 = time.perf_counter()
            progress(f"measure: on the attached {target.name} device with {req.device_runner}")
            device_result = target.on_device(staging, req.device_runner, req.device_serial, req.out.name,
                                             **req.extra.get("device_options", {}))
            timings["device_s"] = time.perf_counter() - t0

        progress("bundle: manifest and reports")
        files = [staging / f for f in artifact.files]
        info = {
            "target": target.name, "format": fmt.name, "recipe": recipe,
            "model": {**loaded.identity, "kind": loaded.kind},
            "artifact": {"files": artifact.files, "bytes": sum(f.stat().st_size for f in files), "notes": artifact.notes},
            "tokenizer_files": tokenizer_files,
            "parity": parity_result, "latency": latency_result, "device": device_result, "timings_s": timings,
            "budget_failures": target.budgets.failures(latency_result["latency"]) if latency_result else [],
        }
        manifest = bundle.write_manifest(staging, info)
        report.write_reports(staging, manifest)
        bundle.publish(staging, req.out)
    return manifest


def fit_context(loaded, requested: int | None) -> tuple[int, str | None]:
    """The KV-cache length to export: ``requested``, or min(512, the model's positions) with a note."""
    cfg = loaded.config.get_text_config() if hasattr(loaded.config, "get_text_config") else loaded.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if requested is not None:
        return int(requested), None
    if positions and positions < DEFAULT_MAX_CONTEXT:
        return int(positions), (f"max context {positions}: the model's own positions "
                                f"(fewer than the default {DEFAULT_MAX_CONTEXT}; --max-context sets it)")
    return DEFAULT_MAX_CONTEXT, None


def protected_paths(req: ExportRequest) -> tuple[Path, ...]:
    """What ``--out`` must never replace: the model (file or folder), the model cache, the calibration text."""
    from .loading import EMBEDDED, default_cache_dir

    paths = [req.cache_dir or default_cache_dir()]
    if req.model and req.model not in EMBEDDED:
        paths.append(Path(req.model).expanduser())
    if req.calibration:
        paths.append(Path(req.calibration))
    return tuple(paths)


def _precheck_device(target, fmt_name: str, req: ExportRequest) -> None:
    """Refuse ``--runner`` early (before minutes of export) if the target or device cannot take it."""
    if target.on_device is None:
        raise SlmExportError(f"target {target.name!r} has no on-device run for --runner",
                             hint="--runner runs an ExecuTorch runner binary over adb: use it with --target android")
    target.on_device_precheck(req.device_runner, req.device_serial, fmt_name)


def _parity_table(parity_result: dict) -> str:
    rows = report.parity_rows(parity_result)
    width = max(len(r[0]) for r in rows)
    lines = [f"  {a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines + [f"  failed: {f}" for f in parity_result["failures"]])


def summary_exception(e: Exception) -> SlmExportError:
    """Wrap an unexpected error for one-line display."""
    from .errors import condense

    return SlmExportError(f"internal error: {condense(e, limit=500)}",
                          hint="run again with --debug for the traceback")
