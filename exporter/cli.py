"""The ``slm-export`` command line.

    slm-export --target rpi [--model PATH] [--format F] [--recipe R] --out DIR   (the export; also `slm-export export ...`)
    slm-export recipes                                                           (what each format and target can do)
    slm-export verify BUNDLE                                                     (the bundle in the field's runtimes)
    slm-export sweep SWEEP.toml --out DIR                                        (a matrix of exports, locally or on Ray)
"""

from __future__ import annotations

import errno
import signal
import sys
import time
from pathlib import Path

import click

from .errors import SlmExportError
from .recipes import RECIPES
from .runtime.files import BundleFileError
from targets import TARGETS

# Formats are listed statically so `--help` does not import the format modules (and torch);
# a test checks that this equals the registry. Targets and recipes are plain data: read live.
FORMAT_CHOICES = ("onnx", "pte", "tflite")
TARGET_CHOICES = tuple(TARGETS.names())
RECIPE_CHOICES = tuple(RECIPES.names())


class DefaultToExport(click.Group):
    """A group whose default command is ``export``: ``slm-export --target rpi`` == ``slm-export export --target rpi``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        """The headline command first (usage, its main options, an example per target), then the commands."""
        formatter.write_usage("slm-export", "--target TARGET [--model PATH] [--format F] [--recipe R] --out DIR")
        formatter.write_usage("slm-export", "COMMAND [ARGS]...", prefix="   or: ")
        self.format_help_text(ctx, formatter)
        with formatter.section("Export (the default command; `slm-export export --help` lists every option)"):
            formatter.write_dl([
                ("--target", " | ".join(TARGET_CHOICES) + ": sets the default format and recipe"),
                ("--out DIR", "the bundle folder to create (--force replaces it)"),
                ("--model PATH", "HF folder, .gguf file or embedded name (default: the embedded SmolLM2-135M-Instruct)"),
                ("--format F", " | ".join(FORMAT_CHOICES)),
                ("--recipe R", " | ".join(RECIPE_CHOICES) + " (see `slm-export recipes`)"),
            ])
        with formatter.section("Examples (the default format and recipe of each target)"):
            for t in (TARGETS.get(name) for name in TARGET_CHOICES):
                command = f"slm-export --target {t.name} --out {t.name}-bundle"
                formatter.write(f"{'':{formatter.current_indent}}{command:<48} # {t.default_format} "
                                f"{t.default_recipe(t.default_format)}, {t.description.split(':')[0]}\n")
        self.format_options(ctx, formatter)


@click.group(cls=DefaultToExport, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slm-export")
def cli():
    """Export small language models for phones, boards and microcontrollers, checked and measured."""


@cli.command()
@click.option("--target", type=click.Choice(TARGET_CHOICES), required=True, help="Device kind; sets the default format and recipe.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to create.")
@click.option("--model", default=None, help="HF folder, .gguf file, or embedded name (default: smollm2-135m-instruct).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default=None, help="Artifact format (default: the target's).")
@click.option("--recipe", type=click.Choice(RECIPE_CHOICES), default=None, help="Quantization recipe (default: the target's).")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Text file to calibrate int8-static on (default: a built-in public-domain sample).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--no-gate", is_flag=True, help="Keep the bundle even if parity thresholds fail (experiments).")
@click.option("--no-latency", is_flag=True, help="Skip the latency check.")
@click.option("--max-context", type=click.IntRange(16, 32768), default=None,
              help="KV-cache length for static-cache formats (default: 512, or the model's positions if fewer).")
@click.option("--group-size", type=click.IntRange(8, 1024), default=32, show_default=True, help="Weight group size of int4-weight (tflite: 32, 64, 128 or 256).")
@click.option("--prefill-lengths", default="32,128", show_default=True, help="tflite: fixed prefill signature lengths, comma-separated.")
@click.option("--decode-tokens", type=click.IntRange(1, 4096), default=64, show_default=True, help="Tokens decoded per latency repeat.")
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True, help="Measured latency repeats (after 1 warm-up).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Runtime threads (default: the runtime's).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where converted models are cached (default $SLM_EXPORT_CACHE or ~/.cache/slm-export).")
@click.option("--trust-pickle", is_flag=True, help="Allow a folder with only pickled .bin weights (read with weights_only=True).")
@click.option("--runner", "device_runner", default=None, help="android: also run the bundle on the attached phone with this ExecuTorch runner binary (llama_main).")
@click.option("--serial", "device_serial", default=None, help="android: adb serial of the phone for --runner (default: the only one attached).")
@click.option("--board", default=None, help="mcu: board profile whose flash/RAM budget applies (see targets/mcu.py).")
@click.option("--cross-check", is_flag=True, help="Compare a GGUF's PyTorch reference with llama.cpp on the same file (builds llama.cpp once, minutes; used anyway when already built).")
@click.option("--no-reference-check", is_flag=True, help="Skip the checks that the PyTorch reference is a working model (perplexity, llama.cpp).")
@click.option("--no-verify", is_flag=True, help="Skip running the bundle in the field's runtimes (onnxruntime-genai, ExecuTorch's runner, ...).")
@click.option("--inspect", "inspect_layers", is_flag=True, help="Also measure per-layer divergence of the quantization (as `slm-export inspect`) into the manifest and report.html.")
@click.option("--max-ppl-change", default=None, metavar="PCT",
              help="Accuracy budget: perplexity within this change of the model's (e.g. 2%); the most sensitive layers are kept finer until the gate meets it.")
@click.option("--min-top1", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy budget: top-1 agreement with the model at least this (e.g. 0.95); as --max-ppl-change.")
@click.option("--verbose", is_flag=True, help="Show everything libraries print (known harmless noise included).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export(target, out, model, fmt, recipe, calibration, force, no_gate, no_latency, max_context, group_size,
           prefill_lengths, decode_tokens, repeats, threads, cache_dir, trust_pickle, device_runner, device_serial,
           board, cross_check, no_reference_check, no_verify, inspect_layers, max_ppl_change, min_top1, verbose, debug):
    """Export a model for a target, check parity, measure latency, write a bundle."""
    from .mixed_precision import Budget, parse_ppl_change
    from .pipeline import ExportRequest

    try:
        budget = Budget(parse_ppl_change(max_ppl_change), min_top1)
    except SlmExportError as e:
        raise click.BadParameter(e.message, param_hint="--max-ppl-change") from None
    req = ExportRequest(target=target, out=out, model=model, format=fmt, recipe=recipe, force=force,
                        gate=not no_gate, measure=not no_latency, calibration=calibration, cache_dir=cache_dir,
                        trust_pickle=trust_pickle, max_context=max_context, group_size=group_size,
                        prefill_lengths=_lengths(prefill_lengths),
                        decode_tokens=decode_tokens, repeats=repeats, threads=threads,
                        device_runner=device_runner, device_serial=device_serial,
                        reference_check="never" if no_reference_check else "always" if cross_check else "auto",
                        verify=not no_verify, inspect=inspect_layers, budget=budget or None,
                        extra={"board": board} if board else {})
    _run_guarded(lambda: _export(req, verbose), debug)


def _latency_table(title: str, latency: dict):
    """A rich table of latency figures (host check, on-device run)."""
    from rich.table import Table

    from . import report

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value")
    for row in report.latency_rows(latency):
        table.add_row(*row)
    return table


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of token counts", param_hint="--prefill-lengths")
    if not values or values[0] < 1:
        raise click.BadParameter("give at least one positive length", param_hint="--prefill-lengths")
    return values


def _export(req, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from . import pipeline, report
    from .loading import default_cache_dir
    from .terminal import History, duration, open_terminal

    plan = pipeline.resolve(req)  # once: run() follows this plan, it does not resolve again
    run_key = f"{req.model or 'smollm2-135m-instruct'} -> {plan.target.name} {plan.format} {plan.recipe}"
    history = History((req.cache_dir or default_cache_dir()) / "timings.json", run_key)
    terminal = open_terminal(verbose, history)
    last = history.estimate("whole export")
    terminal(f"target {plan.target.name}: format {plan.format}, recipe {plan.recipe}"
             + (f"; the last run of this export on this machine took {duration(last)}" if last else ""))
    with terminal.running():
        manifest = pipeline.run(req, terminal, plan)
        history.record("whole export", time.perf_counter() - terminal.start)
    out = Console()
    parity = manifest["parity"]
    table = Table(title=f"parity {plan.format} / {plan.recipe}: {'passed' if parity['passed'] else 'FAILED'}")
    for col in ("metric", "value", "threshold"):
        table.add_column(col)
    for row in report.parity_rows(parity):
        table.add_row(*row)
    out.print(table)
    if manifest.get("latency"):
        out.print(_latency_table(f"latency on this machine ({manifest['latency']['runtime']})",
                                 manifest["latency"]["latency"]))
    if manifest.get("device"):
        out.print(_latency_table("latency on the device", manifest["device"]["latency"]))
    if manifest.get("runtimes"):
        from .verify import rows_from_json

        out.print(verify_table(rows_from_json(manifest), "the bundle in the field's runtimes"))
    if manifest.get("inspect"):
        head, _, units = inspect_tables(manifest["inspect"])
        out.print(head, units)
    if manifest.get("mixed_precision"):
        out.print(_mixed_precision_table(manifest["mixed_precision"]))
    out.print(_summary_table(manifest, req.out, time.perf_counter() - terminal.start))


def _mixed_precision_table(record: dict):
    """What the accuracy budget kept finer, round by round (``exporter.mixed_precision``)."""
    from rich.table import Table

    from . import report

    table = Table(title=f"accuracy budget ({report.budget_text(record['budget'])}): {record.get('result')}")
    for col in report.MIXED_HEADER:
        table.add_column(col)
    for row in report.mixed_precision_rows(record):
        table.add_row(*row)
    return table


def _summary_table(manifest: dict, out: Path, seconds: float):
    """The end of an export: what was written, whether it holds, how fast, what misses a budget."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in summary_rows(manifest, out, seconds):
        style = "red" if value.startswith(("FAILED", "missed")) else ""
        table.add_row(label, Text(value, style=style))  # Text: model names and paths are not markup
    return table


def summary_rows(manifest: dict, out: Path, seconds: float) -> list[tuple[str, str]]:
    """(label, value) rows of the end-of-run summary (also what tests read)."""
    from . import report
    from .htmlpage import human_bytes
    from .terminal import duration

    parity = manifest["parity"]
    met = parity.get("metrics", {})
    figures = [f"{label} {fmt.format(met[key])}" for key, label, fmt in (
        ("top1_agreement", "top-1", "{:.3f}"), ("ppl_rel_change", "perplexity", "{:+.1%}"),
        ("cosine_min", "min cosine", "{:.4f}"), ("label_agreement", "labels", "{:.3f}"),
        ("accuracy_int8", "held-out accuracy", "{:.1%}")) if isinstance(met.get(key), (int, float))]
    if "greedy_identical" in met:
        figures.append("greedy identical" if met["greedy_identical"] else
                       f"greedy differs from token {met.get('greedy_first_diff')}")
    verdict = "passed" if parity["passed"] else "FAILED (kept with --no-gate): " + "; ".join(parity["failures"])
    rows = [("bundle", f"{out}  (open {out / 'report.html'})"),
            ("artifact", report.artifact_size(manifest, human_bytes)),
            ("parity", f"{verdict}: {', '.join(figures)}" if figures else verdict)]
    rows.append(("latency", _latency_summary(manifest)))
    misses = manifest.get("budget_failures") or []
    rows.append(("budgets", "missed on this machine (they apply on the device): " + "; ".join(misses) if misses
                 else "all met" if manifest.get("latency") or "flash" in manifest else "not checked (no latency run)"))
    rows.append(("took", duration(seconds)))
    return rows


def _latency_summary(manifest: dict) -> str:
    """One line of latency: the device's when it ran there, else this host's, saying it is not the device."""
    def figures(lat: dict) -> str:
        parts = [f"{lat['decode_tok_s']:.1f} tok/s decode" if lat.get("decode_tok_s") else "",
                 f"TTFT {lat['ttft_ms']:.0f} ms" if lat.get("ttft_ms") else "",
                 f"encode {lat['encode_ms']:.1f} ms" if lat.get("encode_ms") else "",
                 f"peak RSS {lat['peak_rss_mb']:.0f} MB" if lat.get("peak_rss_mb") else ""]
        return ", ".join(p for p in parts if p)

    if manifest.get("device"):
        dev = manifest["device"].get("device", {})
        return f"{figures(manifest['device']['latency'])} on the device ({dev.get('model') or dev.get('serial', '?')})"
    latency = manifest.get("latency")
    if not latency:
        return "not measured (--no-latency)"
    from .report import machine_name

    where = machine_name(latency)
    if manifest["target"] == "host":
        return f"{figures(latency['latency'])} on this machine, {where}"
    return f"{figures(latency['latency'])} measured on this host, {where}, not on the {manifest['target']} device"


@cli.command()
@click.option("--explain", "explain", type=click.Choice(RECIPE_CHOICES), default=None,
              help="Print this recipe's quantization plan (rules per format).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default=None, help="With --explain: only this format.")
@click.option("--model", default=None, help="With --explain: also show which layer of this model gets what.")
@click.option("--group-size", type=click.IntRange(8, 1024), default=32, show_default=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def recipes(explain, fmt, model, group_size, debug):
    """List every format x recipe and each target's defaults; --explain RECIPE prints its plan."""
    if explain:
        _run_guarded(lambda: _explain(explain, fmt, model, group_size), debug)
        return
    from rich.console import Console
    from rich.table import Table

    from targets import TARGETS

    from .formats import FORMATS
    from .recipes import RECIPES

    table = Table(title="recipes by format")
    table.add_column("recipe")
    table.add_column("meaning")
    for f in FORMATS:
        table.add_column(f.name)
    for recipe in RECIPES:
        table.add_row(recipe.name, recipe.description, *[_recipe_cell(f, recipe.name) for f in FORMATS])
    console = Console(width=160)
    console.print(table)
    targets = Table(title="targets")
    for col in ("target", "formats (first is default)", "default recipe per format", "transport"):
        targets.add_column(col)
    for t in TARGETS:
        targets.add_row(t.name, ", ".join(t.formats), ", ".join(f"{f}: {t.default_recipe(f)}" for f in t.formats), t.transport)
    console.print(targets)
    console.print("`slm-export recipes --explain RECIPE [--model M]` shows a recipe's plan, layer by layer.")


def _recipe_cell(fmt, recipe: str) -> str:
    if recipe in fmt.recipes:
        return "yes"
    return fmt.recipe_notes.get(recipe, "-")


def _explain(recipe_name: str, fmt_name: str | None, model: str | None, group_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from .recipes import explain, get_recipe

    recipe = get_recipe(recipe_name)
    console = Console(width=160)
    formats = [fmt_name] if fmt_name else list(FORMAT_CHOICES)
    console.print(f"[bold]{recipe.name}[/bold]: {recipe.description}")
    def limits(thresholds) -> str:
        return ", ".join(f"{k} {v}" for k, v in vars(thresholds).items() if v not in (None, False))

    console.print("parity thresholds: " + limits(recipe.thresholds))
    for f, thresholds in recipe.format_thresholds.items():
        console.print(f"  {f}: " + limits(thresholds))
    if recipe.source_grid_thresholds is not None:
        console.print("  when the artifact carries a quantized source's 4-bit blocks: "
                      + limits(recipe.source_grid_thresholds))
    for f in formats:
        rules = recipe.plan(f)
        table = Table(title=f"{f} plan (first matching rule wins; layers no rule takes stay float)")
        for col in ("#", "matches", "gets", "why"):
            table.add_column(col)
        for i, rule in enumerate(rules, 1):
            table.add_row(str(i), rule.match if rule.match != "*" else "* (any other linear)",
                          rule.describe(group_size), rule.why)
        if not rules:
            table.add_row("-", "everything", "float" if recipe.name != "fp16" else "float16", "")
        console.print(table)
        keep = recipe.keep_rule(f)
        if keep is not None:
            console.print(f"  with --max-ppl-change / --min-top1, the layers the budget keeps get: "
                          f"{keep.describe(group_size)}")
    if model:
        from .loading import load_model

        loaded = load_model(model)
        for f in formats:
            source = None
            if recipe.name == "int4-weight" and loaded.kind == "causal-lm":
                from .source_grid import plan_for_format

                source = plan_for_format(loaded.model, loaded.family, recipe.name, f, group_size)
            rows = explain(recipe, f, loaded.family, loaded.model, group_size, source)
            table = Table(title=f"{f}: what each layer of {loaded.identity.get('model_type')} "
                                f"({loaded.family.name} family) gets")
            for col in ("layer", "role", "gets", "why"):
                table.add_column(col, overflow="fold")
            for row in _collapse_layers(rows):
                table.add_row(*row)
            console.print(table)


def _collapse_layers(rows):
    """Rows of identical layers across decoder layers shown once, as ``layers.{0..29}.mlp.down_proj``."""
    import re

    groups: dict = {}
    for name, role, gets, why in rows:
        m = re.search(r"\.(\d+)\.", name)
        key = (re.sub(r"\.\d+\.", ".{i}.", name, count=1) if m else name, role, gets, why)
        groups.setdefault(key, []).append(int(m.group(1)) if m else None)
    out = []
    for (name, role, gets, why), idx in groups.items():
        if idx and idx[0] is not None:
            name = name.replace("{i}", f"{{{min(idx)}..{max(idx)}}}" if len(idx) > 1 else str(idx[0]))
        out.append((name, role, gets, why))
    return out


@cli.command()
def models():
    """List the model families: model types, kind, and which formats x recipes tests cover."""
    from rich.console import Console
    from rich.table import Table

    from .families import FAMILIES, coverage

    covered = coverage()
    table = Table(title="model families (one file each in exporter/families/)")
    for col in ("family", "model types", "kind", "onnx", "tflite", "pte", "needs", "e.g."):
        table.add_column(col, overflow="fold")
    for fam in sorted(FAMILIES, key=lambda f: (f.kind, f.name)):
        cells = []
        for fmt in ("onnx", "tflite", "pte"):
            reason = fam.refusal(fmt)
            cells.append(f"refused: {reason}" if reason else ", ".join(covered.get((fam.name, fmt), [])) or "not tested")
        table.add_row(fam.name, ", ".join(fam.model_types), fam.kind, *cells, ", ".join(fam.special), fam.examples)
    Console(width=200).print(table)


def _run_guarded(fn, debug: bool,
                 interrupted: str = "interrupted: nothing was written (the partial bundle was removed)") -> None:
    """Run ``fn``; turn known errors into one message and an exit code (tracebacks only with --debug).

    ``interrupted`` is what Ctrl-C / SIGTERM prints (exit 130) when ``fn`` does not handle it itself.
    """
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C so the staging folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        fn()
    except SlmExportError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except BundleFileError as e:  # a damaged or tampered bundle given to verify / inspect: bad input, not a bug
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
    except OSError as e:  # a full disk, a folder removed under us: say which file and why
        if debug:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        reason = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        click.echo(f"error: {reason or type(e).__name__}{where}; nothing was written", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            raise
        from .pipeline import summary_exception

        click.echo(f"error: {summary_exception(e)}", err=True)
        sys.exit(1)


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--runtime", "runtimes", multiple=True, help="Only this runtime (repeatable; our runner always runs).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the rows as JSON here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_command(bundle, runtimes, json_path, debug):
    """Run a bundle in every runtime that applies to its format; exit 6 if one that is installed rejects it
    or generates other greedy tokens than ours."""
    _run_guarded(lambda: _verify(bundle, runtimes, json_path), debug)


def _verify(bundle_dir: Path, runtimes: tuple[str, ...], json_path: Path | None) -> None:
    import json

    from rich.console import Console

    from . import verify
    from .errors import RuntimeRejectedBundle
    from .runtime.base import verify as check_files

    known = verify.RUNTIMES.names()
    unknown = [r for r in runtimes if r not in known]
    if unknown:
        raise SlmExportError(f"unknown runtime {', '.join(unknown)}; choose from: {', '.join(known)}")
    manifest = check_files(bundle_dir)  # hashes and sizes against the manifest: a tampered bundle is refused first
    rows = verify.verify(bundle_dir, manifest, only=runtimes)
    if not rows:
        raise SlmExportError(f"{bundle_dir} holds a {manifest.get('model', {}).get('kind')} model: the field "
                             "runtimes checked here generate text (causal LMs only)")
    Console().print(verify_table(rows, f"{bundle_dir}: {manifest['format']} / {manifest['recipe']}"))
    if json_path:
        json_path.write_text(json.dumps(verify.as_json(rows), indent=2))
    bad = [r for r in rows if r.status in (verify.FAILED, verify.DIFFERS)]
    if bad:
        raise RuntimeRejectedBundle(f"{len(bad)} runtime(s) rejected the bundle or generated other tokens: "
                                    + ", ".join(r.runtime for r in bad))


def verify_table(rows, title: str):
    """The rich table of ``verify`` rows (also printed at the end of an export)."""
    from rich.table import Table
    from rich.text import Text

    from . import verify

    table = Table(title=title)
    for col in verify.TABLE_HEADER:
        table.add_column(col, overflow="fold", no_wrap=col == "runtime")
    for row, cells in zip(rows, verify.table_rows(rows)):
        style = "red" if row.status in (verify.FAILED, verify.DIFFERS) else ""
        table.add_row(*cells[:-1], Text(cells[-1], style=style))
    return table


@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--model", default=None, help="The model the bundle came from (default: the manifest's).")
@click.option("--windows", type=click.IntRange(1, 64), default=3, show_default=True, help="Evaluation windows of text.")
@click.option("--window", type=click.IntRange(16, 4096), default=128, show_default=True, help="Tokens per window.")
@click.option("--no-artifact", is_flag=True, help="Skip running the artifact (no fidelity check of the simulation).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the figures as JSON here.")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write a page with the per-layer plot here.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="Most sensitive units shown.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(bundle, model, windows, window, no_artifact, json_path, html_path, top, debug):
    """Per-layer divergence of a bundle's quantization: hidden-state drift after each decoder layer, and
    what each layer's attention / MLP (and the embedding, the LM head) costs quantized alone."""
    _run_guarded(lambda: _inspect(bundle, model, windows, window, not no_artifact, json_path, html_path, top),
                 debug, interrupted="interrupted")


def _inspect(bundle_dir: Path, model, windows: int, window: int, run_artifact: bool, json_path, html_path,
             top: int) -> None:
    import json

    from rich.console import Console

    from . import divergence
    from .terminal import open_terminal

    terminal = open_terminal()
    with terminal.running():
        result = divergence.inspect_bundle(bundle_dir, model, windows, window, run_artifact, progress=terminal)
    out = Console()
    for table in inspect_tables(result, top):
        out.print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    if html_path:
        html_path.write_text(divergence.html_page(result))


def inspect_tables(result: dict, top: int = 10) -> list:
    """The rich tables of ``inspect``: the whole simulation and its fidelity, drift, most sensitive units."""
    from rich.table import Table

    from .divergence import most_sensitive

    head = Table(title=f"{result['bundle']}: {result['format']} / {result['recipe']} "
                       f"({result['windows']} windows x {result['window']} tokens)")
    for col in ("", "top-1", "ppl change", "KL"):
        head.add_column(col)
    rows = [("simulation, every layer quantized", result["simulated"])]
    fid = result.get("fidelity")
    if fid:
        rows.append(("the artifact in its runtime", fid["artifact"]))
    for label, s in rows:
        head.add_row(label, f"{s['top1_agreement']:.3f}", f"{s['ppl_rel_change']:+.2%}", f"{s['kl']:.4f}")
    if fid:
        head.caption = (f"simulation vs artifact logits: mean |diff| {fid['simulation_vs_artifact']['mean_abs_err']:.4g} "
                        f"(reference vs artifact {fid['reference_vs_artifact']['mean_abs_err']:.4g}), top-1 agreement "
                        f"{fid['simulation_vs_artifact']['top1_agreement']:.3f}")
    drift = Table(title="hidden-state drift, every layer quantized")
    for col in ("after", "relative error", "cosine"):
        drift.add_column(col)
    for d in result["drift"]:
        drift.add_row(d["after"], f"{d['rel_err']:.4f}", f"{d['cosine']:.5f}")
    units = Table(title=f"the {top} units whose quantization alone costs most (the rest float)")
    for col in ("unit", "quantization", "top-1", "ppl change", "KL"):
        units.add_column(col, overflow="fold")
    for r in most_sensitive(result, top):
        units.add_row(r["unit"], ", ".join(r["scheme"]), f"{r['top1_agreement']:.3f}", f"{r['ppl_rel_change']:+.2%}",
                      f"{r['kl']:.4f}")
    return [head, drift, units]


@cli.command("sweep")
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for every cell's bundle and summary.{json,html}.")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None,
              help="At most this many cells at once (default: as many as cores and memory allow).")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Run each cell as a task on this Ray cluster (pip install 'slm-export[cluster]').")
@click.option("--resume", is_flag=True, help="Skip cells whose bundle is already in OUT and verifies; redo the others.")
@click.option("--skip-impossible", is_flag=True, help="List the cells the export would refuse and run the rest.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sweep_command(sweep_file, out, jobs, ray_address, resume, skip_impossible, debug):
    """Export every cell of a SWEEP.toml matrix (models x targets x formats x recipes), locally or on Ray; one
    summary table (and OUT/summary.html); exit 1 if any cell failed, 130 on Ctrl-C."""
    _run_guarded(lambda: _sweep(sweep_file, out, jobs, ray_address, resume, skip_impossible), debug,
                 interrupted="interrupted before any cell started; nothing was written")


def _sweep(sweep_file, out, jobs, ray_address, resume, skip_impossible) -> None:
    from rich.console import Console

    from . import sweep as sweep_mod
    from .sweep import summary

    try:
        sweep_def, run = sweep_mod.run_sweep(sweep_file, out, jobs=jobs, ray=ray_address, resume=resume,
                                             skip_impossible=skip_impossible)
    except sweep_mod.SweepInterrupted as e:
        done = sum(r["status"] != sweep_mod.CANCELLED for r in e.results.values())
        click.echo(f"interrupted: {done} of {len(e.results)} cells finished, the others were cancelled "
                   f"(no half-written bundle); summary in {out}/summary.json", err=True)
        sys.exit(130)
    Console(width=200).print(summary.table(run, sweep_def))
    bad = [name for name, r in run.results.items() if r["status"] in sweep_mod.FAILED]
    click.echo(f"summary: {out}/summary.html, {out}/summary.json")
    if bad:
        raise SlmExportError(f"{len(bad)} of {len(run.results)} cells did not pass: {', '.join(bad)}",
                             hint=f"see the table above, {out}/summary.html and {out}/logs/<cell>.log")


@cli.group()
def farm():
    """Deploy bundles to a farm of devices (ssh / local) and check them there."""


@farm.command("run")
@click.argument("farm_file", metavar="FARM", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Bundle folder written by slm-export (repeat for several).")
@click.option("--device", "devices", multiple=True, help="Only this device of the farm file (repeatable).")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write JUnit XML here.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the HTML report (with plots) here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def farm_run(farm_file, bundles, devices, junit, json_path, html_path, debug):
    """Deploy and check every bundle on every device of FARM, in parallel; exit 4 if any device failed or is down."""
    _run_guarded(lambda: _farm_run(farm_file, bundles, devices, junit, json_path, html_path), debug,
                 interrupted="interrupted before any device was contacted; no report was written")


def _farm_run(farm_file, bundles, devices, junit, json_path, html_path) -> None:
    from rich.console import Console

    from . import farm as farm_mod
    from .errors import DeviceError

    console = Console(stderr=True)
    start = time.perf_counter()
    farm_def = farm_mod.load_farm(farm_file)
    # Before any device work: an unwritable report path must not cost the whole run's results.
    farm_mod.check_report_paths({"--junit": junit, "--json": json_path, "--html": html_path})
    interrupted = None
    try:
        reports = farm_mod.run_farm(farm_def, list(bundles), only=list(devices) or None,
                                    progress=lambda m: console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {m}"))
    except farm_mod.FarmInterrupted as e:  # Ctrl-C / SIGTERM: report what finished, then exit 130
        reports, interrupted = e.reports, e
    _farm_table(farm_file, reports)  # first: the results are on screen even if a report cannot be written
    farm_mod.write_reports(reports, farm_def, junit=junit, json_path=json_path, html_path=html_path)
    if interrupted:
        written = ", ".join(str(p) for p in (junit, json_path, html_path) if p) or "none requested"
        click.echo(f"interrupted: {interrupted.finished} of {len(reports)} devices finished; "
                   f"reports written to {written}", err=True)
        sys.exit(130)
    bad = [r.name for r in reports if r.status != "passed"]
    if bad:
        raise DeviceError(f"{len(bad)} of {len(reports)} devices did not pass: {', '.join(bad)}",
                          hint="see the reasons above" + (f" and {html_path}" if html_path else ""))


def _farm_table(farm_file, reports) -> None:
    """The summary table of a farm run, one row per device."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"farm {farm_file}")
    for col in ("device", "target", "status", "checks", "reason"):
        table.add_column(col, overflow="fold")
    for r in reports:
        counts = {}
        for _, c in r.all_checks():
            counts[c.status] = counts.get(c.status, 0) + 1
        # Text(): a reason quotes device output, which must not be read as rich markup.
        table.add_row(r.name, r.target, r.status, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                      Text(r.reason))
    Console(width=160).print(table)


@cli.command()
@click.option("--intent", "intents", multiple=True, help="Train on these intents only (repeatable; default: all OVOS + drone intents).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="Training epochs (default: the student config's).")
@click.option("--retrain", is_flag=True, help="Train again even if a cached student exists.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root (default $SLM_EXPORT_CACHE or ~/.cache/slm-export); the student goes in <root>/mcu/.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def distill(intents, epochs, retrain, cache_dir, debug):
    """Distil (or show the cached) command-intent student of the mcu target; print held-out accuracies."""
    _run_guarded(lambda: _distill(list(intents) or None, epochs, retrain, cache_dir), debug)


def _distill(intents, epochs, retrain, cache_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    from .loading import default_cache_dir
    from .mcu import data as mcu_data
    from .mcu import distill as mcu_distill
    from .terminal import History, open_terminal

    known = mcu_data.all_templates()
    unknown = [i for i in intents or [] if i not in known]
    if unknown:
        raise SlmExportError(f"unknown intent(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
    terminal = open_terminal(history=History((cache_dir or default_cache_dir()) / "timings.json", "distill"))
    cfg = mcu_distill.StudentConfig(intents=intents, **({"epochs": epochs} if epochs else {}))
    with terminal.running():
        d, folder, _ = mcu_distill.get_or_train(cfg, cache_dir or default_cache_dir(), retrain=retrain,
                                               progress=terminal)
    table = Table(title=f"held-out accuracy ({d.figures['test_examples']} commands, {d.figures['intents']} intents)")
    table.add_column("model")
    table.add_column("accuracy")
    for label, key in (("teacher all-MiniLM-L6-v2", "teacher_accuracy"), ("student float32", "student_float_accuracy")):
        value = d.figures.get(key)
        table.add_row(label, "n/a" if value is None else f"{value:.1%}")
    Console().print(table)
    Console().print(f"student ({d.figures['parameters']} parameters) cached in {folder}")


@cli.command()
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for bench.{md,csv,json,html}.")
@click.option("--model", default=None, help="Reference model of the eager baseline and parity (default: the embedded SmolLM2).")
@click.option("--no-eager", is_flag=True, help="Leave out the PyTorch eager fp32 baseline.")
@click.option("--optimum", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder exported by optimum-cli (text-generation-with-past) to run as the peer.")
@click.option("--optimum-python", default=None, help="Python of the venv that has optimum-onnx (see benchmarks/optimum_peer.py).")
@click.option("--genai", is_flag=True, help="Also run each ONNX bundle through onnxruntime-genai (its genai_config.json).")
@click.option("--llama-cpp", "llama_cpp", default=None, metavar="TYPES",
              help="llama.cpp contenders, comma-separated GGUF types: source (the model's own GGUF), Q8_0, Q4_K_M, Q4_0, ... "
                   "(builds llama.cpp once, minutes).")
@click.option("--rounds", type=click.IntRange(1, 100), default=5, show_default=True, help="Interleaved measured rounds.")
@click.option("--decode-tokens", type=click.IntRange(2, 4096), default=128, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Threads for every contender (default: each runtime's).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench(bundles, out, model, no_eager, optimum, optimum_python, genai, llama_cpp, rounds, decode_tokens, prompt_tokens,
          threads, debug):
    """Benchmark BUNDLES against PyTorch eager (and optimum-onnx, llama.cpp) in one interleaved run, with the roofline."""
    types = tuple(t.strip() for t in llama_cpp.split(",") if t.strip()) if llama_cpp else ()
    _run_guarded(lambda: _bench(bundles, out, model, no_eager, optimum, optimum_python, rounds, decode_tokens,
                                prompt_tokens, threads, genai, types), debug)


def _bench(bundles, out, model, no_eager, optimum, optimum_python, rounds, decode_tokens, prompt_tokens, threads,
           genai=False, llama_cpp=()):
    from . import bench as bench_mod
    from .errors import SlmExportError
    from .terminal import open_terminal

    if optimum and not optimum_python:
        raise SlmExportError("--optimum needs --optimum-python (optimum-onnx cannot share this environment)",
                             hint="python benchmarks/optimum_peer.py builds that venv and runs the whole comparison")
    terminal = open_terminal()
    with terminal.running():
        result = bench_mod.bench(list(bundles), out, model=model, eager=not no_eager,
                                 optimum=(optimum, optimum_python) if optimum else None, rounds=rounds,
                                 decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, threads=threads,
                                 progress=lambda msg: terminal(f"bench: {msg}"), genai=genai, llama_cpp=llama_cpp)
    click.echo(bench_mod.markdown(result))
    click.echo(f"wrote {out}/bench.md, bench.csv, bench.json, bench.html")


@cli.group()
def device():
    """Run a bundle on one attached device (Android over adb), or build an emulated ARM64 board."""


@device.command("android")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--runner", required=True, help="ExecuTorch LLM runner binary built for Android (e.g. llama_main for arm64-v8a).")
@click.option("--serial", default=None, help="adb serial of the phone (default: the only one attached).")
@click.option("--prompt", default="Tell me a short story about a robot.", show_default=True)
@click.option("--seq-len", type=click.IntRange(2, 32768), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True, help="Measured runs after one warm-up.")
@click.option("--device-root", default=None, help="Folder on the device (default /data/local/tmp/slm-export).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the figures here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def device_android(bundle, runner, serial, prompt, seq_len, repeats, device_root, json_path, debug):
    """Push a .pte BUNDLE with adb, run the ExecuTorch runner on the phone, report its latency."""
    _run_guarded(lambda: _device_android(bundle, runner, serial, prompt, seq_len, repeats, device_root, json_path), debug)


def _device_android(bundle, runner, serial, prompt, seq_len, repeats, device_root, json_path) -> None:
    import json

    from rich.console import Console

    from targets import adb

    kwargs = {"device_root": device_root} if device_root else {}
    result = adb.measure_on_device(bundle, runner, serial=serial, prompt=prompt, seq_len=seq_len,
                                   repeats=repeats, **kwargs)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2, default=str))
    Console().print(_latency_table(f"{bundle.name} on {result['device'].get('model', result['device'].get('serial'))}",
                                   result["latency"]))


@device.command("emulate")
@click.argument("board", required=False, type=click.Choice(("pi4", "pi5", "android-arm64")))
@click.option("--clean", is_flag=True, help="Remove every emulated board and everything the build downloaded.")
@click.option("--rebuild", is_flag=True, help="Build again even if a matching build is cached.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root (default $SLM_EXPORT_CACHE or ~/.cache/slm-export); boards go in <root>/emulated/.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def device_emulate(board, clean, rebuild, cache_dir, debug):
    """Build (once, cached) an emulated ARM64 BOARD for the farm (qemu-aarch64-static), or --clean."""
    from .emulate import cli_emulate

    _run_guarded(lambda: cli_emulate(board, clean, rebuild, cache_dir), debug)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
