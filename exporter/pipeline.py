"""The export pipeline: check -> load (and check the reference) -> export (quantize) -> validate -> measure -> bundle.

``run`` is what ``slm-export --target ...`` calls. ``resolve`` turns the request into a ``Plan`` once
(target, format, recipe, board budgets); the CLI prints that plan and hands it to ``run``. Every target
goes through the same stages over one ``Context``: the kind-specific ones (check, load, export,
validate, measure) come from the target's stage hooks (language models from ``--model``: the ``lm_*``
functions here; a target with ``Target.stages`` names its own module, e.g. ``exporter.mcu.stages``),
while the parity gate, the budget check and the bundle (manifest, reports, publish) are shared. Each
stage reports progress through a callback so the CLI can show it, and everything is written in a
staging folder that is published only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import bundle, latency, parity, reference, report
from .errors import BudgetExceeded, ParityGateFailed, RuntimeRejectedBundle, SlmExportError, UnsupportedRecipeError
from .formats import ExportOptions, get_format
from .loading import load_model
from .progress import task
from .recipes import active_overrides, get_recipe
from .runtime import RUNTIME_SPEC, open_runner
from .texts import calibration_texts, eval_text
from targets import Budgets, Target, get_target

LATENCY_PROMPT_TOKENS = 64
DEFAULT_MAX_CONTEXT = 512
# The kind-specific stages, in order; each is a function (Context) -> None of the target's hooks.
STAGES = ("check", "load", "export", "validate", "measure")


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
    # The reference check (exporter/reference.py): "auto" (llama.cpp when it is built), "always" (build
    # llama.cpp if needed), "never" (--no-reference-check: neither check).
    reference_check: str = "auto"
    verify: bool = True  # run the bundle in the field's runtimes (exporter/verify); --no-verify skips
    inspect: bool = False  # --inspect: per-layer divergence (exporter/divergence.py) into the manifest and report
    # --max-ppl-change / --min-top1: the accuracy the artifact must keep, reached by keeping its most
    # sensitive layers finer (exporter/mixed_precision.py); None: the recipe's plan as it is.
    budget: object = None  # a mixed_precision.Budget
    extra: dict = field(default_factory=dict)  # board, Budgets overrides, device_options, student, retrain


@dataclass(frozen=True)
class Plan:
    """What a request resolves to, once: the CLI prints it and ``run`` follows it."""

    target: Target
    format: str
    recipe: str
    budgets: Budgets  # the target's, or its board profile's with the request's overrides
    board: str | None = None  # the board profile, for a target that has them

    def stages(self) -> dict[str, Callable]:
        """The target's stage hooks by name (its own module imported only now: it may need torch)."""
        if self.target.stages is None:
            return {"check": lm_check, "load": lm_load, "export": lm_export, "validate": lm_validate,
                    "measure": lm_measure}
        hooks = importlib.import_module(self.target.stages)
        return {name: getattr(hooks, name) for name in STAGES}


@dataclass
class Context:
    """What the stages pass along, filled in order: each stage reads what earlier ones set."""

    req: ExportRequest
    plan: Plan
    progress: Callable[[str], None]
    staging: Path | None = None  # the bundle being written (set once the checks passed)
    model: object = None  # load: the model to export (a LoadedModel, the mcu's Distilled student)
    artifact: object = None  # export: a formats.Artifact
    artifact_bytes: int | None = None  # export: None = the artifact files' total size
    parity: dict | None = None  # validate: the parity result the gate reads
    latency: dict | None = None  # measure: host latency (None when not measured)
    memory: dict = field(default_factory=dict)  # measure: flash_bytes / arena_bytes of the artifact
    sections: dict = field(default_factory=dict)  # manifest sections of this kind ("model" first)
    scratch: dict = field(default_factory=dict)  # what one kind's stages hand each other
    timings: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, key: str):
        """Add the block's wall time to ``timings[key]`` (several stages may share one figure)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def resolve(req: ExportRequest) -> Plan:
    """The plan of ``req``; refuses a format, recipe or board the target cannot do, before any work."""
    target = get_target(req.target)
    fmt_name = req.format or target.default_format
    if fmt_name not in target.formats:
        raise UnsupportedRecipeError(f"target {target.name!r} does not run format {fmt_name!r}",
                                     hint=f"{target.name} formats: {', '.join(target.formats)}")
    recipe = req.recipe or target.default_recipe(fmt_name)
    get_recipe(recipe)
    only = target.recipes.get(fmt_name)
    if only and recipe not in only:
        raise UnsupportedRecipeError(f"target {target.name} only builds recipe {', '.join(only)} (got {recipe!r})",
                                     hint=f"drop --recipe or use {', '.join(only)}")
    fmt_recipes = only or get_format(fmt_name).recipes
    if recipe not in fmt_recipes:
        raise UnsupportedRecipeError(f"format {fmt_name!r} cannot do recipe {recipe!r}",
                                     hint=f"{fmt_name} recipes: {', '.join(fmt_recipes)}")
    board, budgets = target.board_budgets(req.extra)
    return Plan(target, fmt_name, recipe, budgets, board)


def run(req: ExportRequest, progress: Callable[[str], None] = lambda m: None, plan: Plan | None = None) -> dict:
    """Export, check and measure; publish the bundle at ``req.out``; return its manifest.

    ``plan`` is ``resolve(req)`` when the caller (the CLI) has already resolved it.
    """
    ctx = Context(req, plan or resolve(req), progress)
    stages = ctx.plan.stages()
    bundle.check_out_dir(req.out, req.force, protected_paths(req))
    if req.inspect:  # refused now rather than after the export
        from .divergence import check_simulated

        check_simulated(ctx.plan.format, ctx.plan.recipe)
    if req.budget:
        check_accuracy_budget(ctx.plan)
    stages["check"](ctx)
    with bundle.writing(req.out, req.force, protected_paths(req), progress) as staging:
        ctx.staging = staging
        stages["load"](ctx)
        stages["export"](ctx)
        stages["validate"](ctx)
        if req.budget:
            fit_accuracy_budget(ctx, stages)
        gate(ctx)
        stages["measure"](ctx)
        if req.verify:
            verify_runtimes(ctx)
        if req.inspect:
            inspect_quantization(ctx)
        manifest = write_bundle(ctx, check_budgets(ctx))
        bundle.publish(staging, req.out)
    return manifest


def gate(ctx: Context) -> None:
    """The parity gate: a failed validation publishes nothing unless ``--no-gate``."""
    if not ctx.parity["passed"] and ctx.req.gate:
        raise ParityGateFailed(
            f"parity gate failed for {ctx.plan.format} / {ctx.plan.recipe}:\n" + _parity_table(ctx.parity),
            hint="nothing was written; pass --no-gate to keep the artifact anyway",
        )


def check_accuracy_budget(plan: Plan) -> None:
    """Refuse --max-ppl-change / --min-top1 where no mixed plan can be searched, before any work."""
    from .mixed_precision import check

    if plan.target.stages is not None:
        raise UnsupportedRecipeError(f"target {plan.target.name} has no accuracy budget search",
                                     hint="--max-ppl-change / --min-top1 mix the precision of language models")
    check(plan.format, plan.recipe)


def fit_accuracy_budget(ctx: Context, stages: dict) -> None:
    """Rebuild the artifact with its most sensitive layers kept finer until the gate's figures meet the
    budget (exporter/mixed_precision.py); the plan chosen goes into the manifest."""
    from . import mixed_precision
    from .recipes import overriding

    if ctx.model.kind != "causal-lm":
        raise UnsupportedRecipeError(f"an accuracy budget covers causal LMs (this is a {ctx.model.kind} model)")

    def rebuild(rules: list) -> dict:
        with overriding(rules):
            stages["export"](ctx)
            stages["validate"](ctx)
        return ctx.parity["metrics"]

    try:
        record = mixed_precision.fit(ctx.model, ctx.plan.format, ctx.plan.recipe, ctx.req.group_size,
                                     ctx.scratch["spec"], ctx.parity["metrics"], ctx.req.budget, rebuild, ctx.progress)
    except mixed_precision.BudgetNotMet as e:
        if ctx.req.gate:
            raise
        record = e.record  # --no-gate: the last rebuild is kept, the miss recorded
    ctx.sections["mixed_precision"] = record
    # the rebuilds' own time is in export_s / parity_s already
    ctx.timings["mixed_precision_search_s"] = record.get("search_s", 0.0)


def verify_runtimes(ctx: Context) -> None:
    """Run the staged bundle in every field runtime for its format (exporter/verify) and record the rows.

    A runtime that is not installed is a row, not a failure; one that is installed and rejects the
    bundle fails the export (nothing is published), since the bundle would not drop into it.
    """
    from . import verify

    staged = {"format": ctx.plan.format, "model": {"kind": ctx.sections["model"].get("kind")},
              "files": {p.name: {} for p in ctx.staging.iterdir()}}
    with ctx.timed("verify_s"), task(ctx.progress, "verify: the bundle in the field's runtimes"):
        rows = verify.verify(ctx.staging, staged, progress=ctx.progress)
    if not rows:
        return
    ctx.sections["runtimes"] = verify.as_json(rows)
    rejected = verify.failed(rows)
    if rejected:
        raise RuntimeRejectedBundle(
            "the bundle does not run in " + ", ".join(r.runtime for r in rejected) + ":\n"
            + "\n".join(f"  {r.runtime} {r.version}: {r.message}" for r in rejected),
            hint="nothing was written; pass --no-verify to keep the bundle anyway")


def inspect_quantization(ctx: Context) -> None:
    """--inspect: where the artifact's quantization loses the model, per layer (``slm-export inspect``)."""
    from . import divergence

    with ctx.timed("inspect_s"):
        result = divergence.inspect_loaded(ctx.model, ctx.staging, ctx.scratch["spec"], ctx.plan.recipe,
                                           progress=ctx.progress)
    ctx.sections["inspect"] = {**result, "bundle": ctx.req.out.name}


def check_budgets(ctx: Context) -> list[str]:
    """The budget misses to record; a memory miss is raised instead (``BudgetExceeded``, nothing written).

    Flash and RAM are properties of the artifact, so a miss means it cannot run on the part; latency
    is measured on this machine, and the budgets apply on the device, so a miss there is only noted.
    """
    budgets = ctx.plan.budgets
    memory = budgets.failures(ctx.memory)
    if memory:
        where = f"board {ctx.plan.board}" if ctx.plan.board else f"target {ctx.plan.target.name}"
        raise BudgetExceeded(f"the model does not fit {where}: " + "; ".join(memory),
                             hint="nothing was written; choose a bigger board profile (--board) or a smaller model")
    return budgets.failures(ctx.latency["latency"]) if ctx.latency else []


def write_bundle(ctx: Context, budget_failures: list[str]) -> dict:
    """The bundle stage: manifest.json and the reports in the staging folder; returns the manifest."""
    ctx.progress("bundle: manifest and reports")
    plan, art = ctx.plan, ctx.artifact
    size = ctx.artifact_bytes
    if size is None:
        size = sum((ctx.staging / f).stat().st_size for f in art.files)
    info = {"target": plan.target.name, "format": plan.format, "recipe": plan.recipe}
    if plan.board:
        info |= {"board": plan.board,
                 "budget": {k: v for k, v in dataclasses.asdict(plan.budgets).items() if v is not None}}
    info |= {"model": ctx.sections.pop("model"),
             "artifact": {"files": art.files, "bytes": size, "notes": art.notes},
             **ctx.sections,
             "parity": ctx.parity, "latency": ctx.latency, "timings_s": ctx.timings,
             "budget_failures": budget_failures}
    manifest = bundle.write_manifest(ctx.staging, info)
    report.write_reports(ctx.staging, manifest)
    return manifest


# The stages of a language model from --model (every target without its own ``Target.stages``).

def lm_check(ctx: Context) -> None:
    """Refuse ``--runner`` the device cannot take, and read the calibration text, before any export."""
    req, plan = ctx.req, ctx.plan
    if req.device_runner:
        _precheck_device(plan.target, plan.format, req)
    calibrated = get_recipe(plan.recipe).calibrated
    ctx.scratch["calibration"] = calibration_texts(req.calibration, ctx.progress) if calibrated else []


def lm_load(ctx: Context) -> None:
    """Load the model (HF folder, GGUF, embedded name) and refuse a kind / family the format cannot do."""
    req = ctx.req
    with ctx.timed("load_s"), task(ctx.progress, f"load: {req.model or 'embedded default smollm2-135m-instruct'}"):
        loaded = load_model(req.model, cache_dir=req.cache_dir, trust_pickle=req.trust_pickle)
        get_format(ctx.plan.format).check(loaded.kind, ctx.plan.recipe, loaded.family)
    ctx.model = loaded
    ctx.sections["model"] = {**loaded.identity, "kind": loaded.kind}
    if req.reference_check != "never":
        with ctx.timed("reference_s"):
            ctx.sections["reference"] = reference.check(loaded, ctx.progress, cross_check=req.reference_check)


def lm_export(ctx: Context) -> None:
    """Build the artifact with the format (quantizing per the recipe), then runtime.json, the parity
    reference, the tokenizer files and the target's extras beside it."""
    loaded, staging = ctx.model, ctx.staging
    with ctx.timed("export_s"):
        max_context, context_note = fit_context(loaded, ctx.req.max_context)
        if context_note:
            ctx.progress(context_note)
        options = ExportOptions(max_context=max_context, group_size=ctx.req.group_size,
                                prefill_lengths=ctx.req.prefill_lengths,
                                calibration_texts=ctx.scratch["calibration"], progress=ctx.progress)
        artifact = get_format(ctx.plan.format).build(loaded, ctx.plan.recipe, options, staging)
    if context_note:
        artifact.notes.append(context_note)
    spec = dict(artifact.spec)
    overrides = active_overrides()
    if overrides:  # a mixed-precision plan: inspect and the device check simulate what was built
        spec["plan_overrides"] = [rule.as_dict() for rule in overrides]
    spec["latency_prompt_ids"] = loaded.tokenizer(" ".join(eval_text().split()),
                                                  add_special_tokens=False)["input_ids"][:LATENCY_PROMPT_TOKENS]
    (staging / RUNTIME_SPEC).write_text(json.dumps(spec, indent=2))
    parity.write_reference(loaded, staging / parity.REFERENCE_FILE, spec.get("eos_token_ids", []),
                           spec.get("max_context"), ctx.req.greedy_tokens)
    ctx.sections["tokenizer_files"] = bundle.copy_tokenizer_files(loaded.folder, staging)
    if ctx.plan.target.bundle_extras:
        ctx.plan.target.bundle_extras(loaded, staging, spec)
    ctx.artifact, ctx.scratch["spec"] = artifact, spec


def lm_validate(ctx: Context) -> None:
    """Parity of the artifact, run by the bundle's own runner, against the PyTorch model."""
    with ctx.timed("parity_s"):
        ctx.progress("validate: parity against PyTorch")
        runner = open_runner(ctx.staging, ctx.scratch["spec"], verify_files=False)  # written by this run, moments ago
        ctx.parity = parity.evaluate(ctx.model, runner, ctx.plan.recipe, greedy_tokens=ctx.req.greedy_tokens,
                                     progress=ctx.progress)
        del runner


def lm_measure(ctx: Context) -> None:
    """Latency on this machine (unless ``--no-latency``), and on the attached device with ``--runner``."""
    req, target = ctx.req, ctx.plan.target
    if req.measure:
        with ctx.timed("measure_s"), task(ctx.progress, f"measure: latency on this machine, 1 warm-up + "
                                                         f"{req.repeats} repeats of {req.decode_tokens} decode tokens"):
            ctx.latency = latency.measure_on_host(ctx.staging, req.decode_tokens, req.repeats, threads=req.threads,
                                                  verify_files=False)
    device_result = None
    if req.device_runner:
        with ctx.timed("device_s"), task(ctx.progress, f"measure: on the attached {target.name} device with "
                                                        f"{req.device_runner}"):
            device_result = target.on_device(ctx.staging, req.device_runner, req.device_serial, req.out.name,
                                             **req.extra.get("device_options", {}))
    ctx.sections["device"] = device_result


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
