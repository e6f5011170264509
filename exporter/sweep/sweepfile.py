"""The sweep file: a TOML matrix of models x targets x formats x recipes, parsed, expanded and checked.

    models = ["path/a", "path/b"]       # or [[model]] tables with name + path; "embedded" = the default
    targets = ["rpi", "android"]
    formats = ["onnx"]                  # optional; default: each target's default format
    recipes = ["fp32", "int8-dynamic"]  # optional; default: each target's default recipe for the format
    cpus_per_cell = 1                   # optional: what one export is given (local pool and Ray requests)
    memory_gb_per_cell = 4              # optional: one export of SmolLM2 peaks at ~3.5 GB
    max_retries = 2                     # optional: attempts more after a worker is lost (killed, OOM)
    [options]                           # ExportRequest options for every cell (the export's flags)
    no_latency = true

Every mistake is a ``SweepFileError`` naming the file (and line where it can), and every cell is checked
with the export's own resolution (``pipeline.resolve``, the format's recipe / kind / family check) before
any work: impossible cells are listed together in one error, or set aside with ``--skip-impossible``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlmExportError

TOP_LEVEL = ("models", "model", "targets", "formats", "recipes", "options", "cpus_per_cell", "memory_gb_per_cell",
             "max_retries")
# [options] key -> (ExportRequest field, type, how the value maps onto the field)
OPTIONS = {
    "no_latency": ("measure", bool, lambda v: not v),
    "no_gate": ("gate", bool, lambda v: not v),
    "no_verify": ("verify", bool, lambda v: not v),
    "no_reference_check": ("reference_check", bool, lambda v: "never" if v else "auto"),
    "inspect": ("inspect", bool, None),
    "trust_pickle": ("trust_pickle", bool, None),
    "decode_tokens": ("decode_tokens", int, None),
    "repeats": ("repeats", int, None),
    "threads": ("threads", int, None),
    "max_context": ("max_context", int, None),
    "group_size": ("group_size", int, None),
    "greedy_tokens": ("greedy_tokens", int, None),
    "prefill_lengths": ("prefill_lengths", list, lambda v: tuple(sorted(set(v)))),
    "calibration": ("calibration", str, Path),
    "cache_dir": ("cache_dir", str, Path),
}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SweepFileError(SlmExportError):
    """The sweep file is not valid; the message names the file (and line)."""


@dataclass(frozen=True)
class Model:
    """One model of the sweep: the name its cells are called by, and what ``--model`` gets (None: embedded default)."""

    name: str
    spec: str | None


@dataclass(frozen=True)
class Cell:
    """One export of the matrix; ``name`` is its bundle folder under OUT."""

    model: Model
    target: str
    format: str
    recipe: str

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.target}-{self.format}-{self.recipe}"


@dataclass
class Sweep:
    """A parsed sweep file: every cell of the matrix (possible or not) and what applies to all of them."""

    path: Path
    models: list[Model]
    cells: list[Cell]
    options: dict = field(default_factory=dict)  # ExportRequest fields
    cpus_per_cell: int = 1
    memory_gb_per_cell: float = 4.0
    max_retries: int = 2

    def request(self, cell: Cell, out: Path, force: bool = False):
        """The ``ExportRequest`` of ``cell``, its bundle at ``out``."""
        from ..pipeline import ExportRequest

        return ExportRequest(target=cell.target, out=out, model=cell.model.spec, format=cell.format,
                             recipe=cell.recipe, force=force, **self.options)


def load_sweep(path: str | Path) -> Sweep:
    """Parse, validate and expand a sweep file (models must exist; names must be known)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as e:
        raise SweepFileError(f"cannot read sweep file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepFileError(f"{path}: not valid TOML: {e}", hint="see https://toml.io for the syntax") from None
    lines = text.splitlines()

    def fail(key: str, message: str, hint: str | None = None):
        raise SweepFileError(f"{path}:{_line(lines, key)}: {message}", hint=hint)

    for key in data:
        if key not in TOP_LEVEL:
            fail(key, f"unknown key {key!r}", hint=_did_you_mean(key, TOP_LEVEL))
    models = _models(data, path.parent, fail)
    targets = _names(data, "targets", _target_names(), fail, required=True)
    formats = _names(data, "formats", _format_names(), fail)
    recipes = _names(data, "recipes", _recipe_names(), fail)
    sweep = Sweep(path, models, _expand(models, targets, formats, recipes), _options(data, path.parent, fail))
    for key, kind, low in (("cpus_per_cell", int, 1), ("memory_gb_per_cell", (int, float), 0.1), ("max_retries", int, 0)):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                fail(key, f"{key} must be a number >= {low} (got {value!r})")
            setattr(sweep, key, value)
    return sweep


def _line(lines: list[str], key: str) -> int:
    """1-based line of ``key = ...`` or ``[key]`` / ``[[key]]`` (tomllib gives no positions); 1 if not found."""
    pattern = re.compile(rf"^\s*(\[\[?\s*{re.escape(key)}\s*\]\]?|[\"']?{re.escape(key)}[\"']?\s*=)")
    return next((n for n, line in enumerate(lines, 1) if pattern.match(line)), 1)


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def _target_names() -> list[str]:
    from targets import TARGETS

    return TARGETS.names()


def _format_names() -> list[str]:
    from ..cli import FORMAT_CHOICES

    return list(FORMAT_CHOICES)


def _recipe_names() -> list[str]:
    from ..recipes import RECIPES

    return RECIPES.names()


def _names(data: dict, key: str, known: list[str], fail, required: bool = False) -> list[str]:
    """A list of known names (targets, formats, recipes); [] when optional and absent."""
    value = data.get(key)
    if value is None:
        if required:
            fail(key, f"no {key!r} given", hint=f"e.g. {key} = [{', '.join(repr(k) for k in known[:2])}]")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        fail(key, f"{key} must be a non-empty list of names (got {value!r})")
    unknown = [v for v in value if v not in known]
    if unknown:
        fail(key, f"unknown {key[:-1]} {', '.join(map(repr, unknown))}", hint=f"{key}: {', '.join(known)}")
    return list(dict.fromkeys(value))


def _models(data: dict, base: Path, fail) -> list[Model]:
    """The models: ``models`` strings and/or ``[[model]]`` tables; omitted = the embedded default."""
    if "models" in data and (not isinstance(data["models"], list) or not all(isinstance(m, str) for m in data["models"])):
        fail("models", f"models must be a list of paths or embedded names (got {data['models']!r})",
             hint="or use [[model]] tables with name and path")
    tables = data.get("model", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        fail("model", "model must be [[model]] tables with name and path")
    entries = [(None, m) for m in data.get("models", [])]
    for t in tables:
        unknown = set(t) - {"name", "path"}
        if unknown:
            fail("model", f"[[model]]: unknown key {sorted(unknown)[0]!r}", hint="a [[model]] has name and path")
        if not all(isinstance(t.get(k, ""), str) for k in ("name", "path")):
            fail("model", f"[[model]]: name and path must be strings (got {t!r})")
        entries.append((t.get("name"), t.get("path", "embedded")))
    models = [_model(name, spec, base) for name, spec in entries or [(None, "embedded")]]
    missing = [m.spec.removeprefix("!missing:") for m in models if m.spec and m.spec.startswith("!missing:")]
    if missing:
        fail("models" if "models" in data else "model", f"model path(s) not found: {', '.join(missing)}",
             hint=f"paths are relative to the sweep file's folder ({base}); embedded names: {_embedded()}")
    names = [m.name for m in models]
    for name in names:
        if not NAME_RE.fullmatch(name):
            fail("model", f"model name {name!r}: names may hold letters, digits, '.', '_', '-'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        fail("model", f"model name {dupes[0]!r} is used twice", hint="give each model a name in a [[model]] table")
    return models


def _embedded() -> str:
    from ..loading import EMBEDDED

    return ", ".join(["embedded", *EMBEDDED])


def _model(name: str | None, spec: str, base: Path) -> Model:
    """A Model from a sweep entry; a path that does not exist comes back as spec ``!missing:PATH``."""
    from ..loading import DEFAULT_MODEL, EMBEDDED

    if spec in ("embedded", "", DEFAULT_MODEL):
        return Model(name or DEFAULT_MODEL, None)
    if spec in EMBEDDED:
        return Model(name or spec, spec)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        return Model(name or path.stem, f"!missing:{spec}")
    return Model(name or (path.stem if path.is_file() else path.name), str(path.resolve()))


def _expand(models: list[Model], targets: list[str], formats: list[str], recipes: list[str]) -> list[Cell]:
    """Every cell: model x target x format (or the target's default) x recipe (or its default for the format)."""
    from targets import get_target

    cells = []
    for model in models:
        for target_name in targets:
            target = get_target(target_name)
            for fmt in formats or [target.default_format]:
                for recipe in recipes or [target.default_recipe(fmt)]:
                    cells.append(Cell(model, target_name, fmt, recipe))
    return list(dict.fromkeys(cells))


def _options(data: dict, base: Path, fail) -> dict:
    """[options] as ExportRequest fields (paths relative to the sweep file's folder)."""
    raw = data.get("options", {})
    if not isinstance(raw, dict):
        fail("options", "[options] must be a table")
    options = {}
    for key, value in raw.items():
        if key not in OPTIONS:
            fail(key, f"[options]: unknown option {key!r}", hint=_did_you_mean(key, OPTIONS))
        attr, kind, convert = OPTIONS[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is list:
            ok = ok and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        if kind is int:
            ok = ok and value > 0
        if not ok:
            fail(key, f"[options]: {key} must be {_kind_name(kind)} (got {value!r})")
        if attr in ("calibration", "cache_dir"):
            value = str(Path(value).expanduser() if Path(value).expanduser().is_absolute() else base / value)
        options[attr] = convert(value) if convert else value
    return options


def _kind_name(kind) -> str:
    return {bool: "true or false", int: "a positive integer", list: "a list of positive integers",
            str: "a path"}[kind]


def check_cells(sweep: Sweep) -> list[tuple[Cell, str]]:
    """(cell, reason) for every cell the export would refuse, found with the export's own checks, before any work.

    Each cell goes through ``pipeline.resolve`` (target x format x recipe, board budgets), ``--inspect``'s
    simulation check, and, for a Hugging Face folder, the format's own ``check`` of the model's kind and
    family read from its config.json (a GGUF or embedded model's family is checked when it is loaded).
    """
    from ..pipeline import resolve

    impossible = []
    kinds = {m.name: _kind_and_family(m) for m in sweep.models}
    for cell in sweep.cells:
        try:
            plan = resolve(sweep.request(cell, Path("unused")))
            if sweep.options.get("inspect"):
                from ..divergence import check_simulated

                check_simulated(plan.format, plan.recipe)
            kind, family = kinds[cell.model.name]
            if kind is not None and plan.target.stages is None:
                from ..formats import get_format

                get_format(plan.format).check(kind, plan.recipe, family)
        except SlmExportError as e:
            impossible.append((cell, e.message))
    return impossible


def _kind_and_family(model: Model):
    """(kind, family) of a Hugging Face folder from its config.json; (None, None) for GGUF / embedded models.

    An unsupported architecture or unreadable config is raised (one error for the whole sweep).
    """
    if model.spec is None or not Path(model.spec).is_dir():
        return None, None
    from transformers import AutoConfig

    from ..errors import ModelLoadError
    from ..families import family_for, model_kind

    try:
        config = AutoConfig.from_pretrained(model.spec)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        from ..errors import condense

        raise ModelLoadError(f"model {model.name}: cannot read {model.spec}/config.json: {condense(e, typed=False)}",
                             hint="a model folder needs config.json and model.safetensors") from None
    family = family_for(config)
    return model_kind(family, config), family
