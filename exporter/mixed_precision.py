"""Accuracy-aware mixed precision: ``--max-ppl-change 2%`` / ``--min-top1 0.95``.

When the recipe's plan misses the user's accuracy budget on the parity gate, the layers whose
quantization costs the most are kept finer (the recipe's ``keep`` rule for the format: float32 on onnx
and pte), as few as the budget needs:

1. **rank**: every unit (one layer's attention, one layer's MLP, the embedding, the LM head) is
   quantized alone in the PyTorch simulation of the format (``exporter.simulate``) on the
   *calibration* text, and ranked by the KL divergence it costs per megabyte keeping it adds;
2. **pick**: the simulation with the top-k units kept estimates the gate's figures. Its errors
   (1 - top-1, |ppl change|) are scaled by the ratio of the real gate's error (evaluation text) to the
   simulation's (calibration text) on the plan as it was, and the smallest k whose prediction meets the
   budget is built. A ratio, not a difference: the two texts' errors shrink together as layers are kept
   (measured on Gemma-3-270M, where a fixed difference predicted ppl +1.9% with every layer kept and the
   gate measured +0.09%);
3. **check**: the artifact is rebuilt with those units' rules (``recipes.overriding``) and the real
   gate runs again; a miss re-measures the ratio at the new k and picks again (a few rounds at most).

The chosen plan goes into runtime.json ("plan_overrides", so ``slm-export inspect`` simulates it) and
the manifest ("mixed_precision": the budget, the ranking, every round's estimate and measurement).
ExecuTorch and LiteRT leave this search to the user (per-module quantizer configs); llama.cpp's k-quant
mixes are fixed per tensor type; this chooses per model, against the gate the bundle ships with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .errors import SlmExportError, UnsupportedRecipeError
from .progress import task

SEARCH_WINDOWS = 4  # calibration windows of the estimates (the gate scores 8 eval windows)
# The ranking runs the model once per unit (~60 for a 30-layer model), so it scores only the first 2 of
# those windows (half the time); the estimates on all 4 and then the real gate check what it picks.
RANK_WINDOWS = 2
MAX_ROUNDS = 4  # real rebuilds after the plan's own artifact
# Bytes per weight of a layer's quantized form, for what keeping it finer costs in size.
_BYTES = {"int4": 0.5 + 4 / 32, "int8": 1.0 + 4 / 32, "float": 4.0}


@dataclass(frozen=True)
class Budget:
    """The accuracy an artifact must keep on the parity gate's evaluation set (None: not asked)."""

    max_ppl_change: float | None = None  # |ppl_art / ppl_ref - 1|, a fraction
    min_top1: float | None = None

    def __bool__(self) -> bool:
        return self.max_ppl_change is not None or self.min_top1 is not None

    def misses(self, metrics: dict) -> list[str]:
        """Why ``metrics`` (a parity result's, or an estimate) miss the budget; empty when met."""
        out = []
        if self.max_ppl_change is not None and not abs(metrics["ppl_rel_change"]) <= self.max_ppl_change:
            out.append(f"ppl change {metrics['ppl_rel_change'] * 100:+.3g}% exceeds ±{self.max_ppl_change * 100:.3g}%")
        if self.min_top1 is not None and not metrics["top1_agreement"] >= self.min_top1:
            out.append(f"top-1 {metrics['top1_agreement']:.4f} < {self.min_top1:g}")
        return out

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def parse_ppl_change(text: str | None) -> float | None:
    """``"2%"`` or ``"0.02"`` -> 0.02 (a fraction); a bad or non-positive value is an error."""
    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SlmExportError(f"--max-ppl-change {text!r} is not a number", hint="e.g. --max-ppl-change 2%") from None
    if not 0 < value < 10:
        raise SlmExportError(f"--max-ppl-change {text!r} must be above 0", hint="e.g. --max-ppl-change 2%")
    return value


def check(fmt: str, recipe: str) -> None:
    """Refuse a budget this format and recipe cannot search (before any export work)."""
    from .divergence import check_simulated
    from .recipes import get_recipe

    if get_recipe(recipe).keep_rule(fmt) is None:
        keeps = [f for f in ("onnx", "pte", "tflite") if get_recipe(recipe).keep_rule(f)]
        raise UnsupportedRecipeError(
            f"an accuracy budget (--max-ppl-change / --min-top1) has no finer step for {fmt} {recipe}",
            hint=f"{recipe} mixes precision on {', '.join(keeps)}" if keeps else "drop the budget")
    check_simulated(fmt, recipe)


def overrides(units: list[dict], keep) -> list:
    """The module-path rules that keep ``units`` finer: ``keep`` for their linears, float for an embedding
    (no format has an 8-bit weight-only lookup that differs from its plan's)."""
    from dataclasses import replace

    from .recipes import Rule

    linears = tuple(m for u in units if u["part"] != "embed" for m in u["modules"])
    tables = tuple(m for u in units if u["part"] == "embed" for m in u["modules"])
    rules = [replace(keep, modules=linears)] if linears else []
    if tables:
        rules.append(Rule("*", "float", why="kept float by the accuracy budget", modules=tables))
    return rules


class Search:
    """The simulation side of the search: one copy of the model, its units ranked, estimates for top-k."""

    def __init__(self, loaded, fmt: str, recipe: str, group_size: int, spec: dict,
                 progress: Callable[[str], None] = lambda m: None):
        import torch

        from . import divergence
        from .recipes import get_recipe, overriding
        from .simulate import Scheme, Simulation
        from .texts import calibration_texts, calibration_windows

        self.loaded, self.fmt, self.recipe = loaded, fmt, recipe
        self.keep = get_recipe(recipe).keep_rule(fmt)
        self.base = divergence.simulated_schemes(fmt, recipe, loaded, group_size, spec)
        modules = dict(loaded.model.named_modules())
        every = [{"part": "embed" if isinstance(modules[n], torch.nn.Embedding) else "layer", "modules": (n,)}
                 for n in self.base]
        with overriding(overrides(every, self.keep)):  # what each layer gets when it is kept
            kept = divergence.simulated_schemes(fmt, recipe, loaded, group_size, spec)
        self.kept = {n: kept.get(n, Scheme()) for n in self.base}  # absent: the keep rule is float
        window = min(128, int(spec.get("max_context") or 128))
        self.windows = calibration_windows(loaded.tokenizer, calibration_texts(None), window, SEARCH_WINDOWS)
        self.sim = Simulation(loaded.model, self.base)
        with task(progress, "mixed precision: the reference on the calibration text", total=len(self.windows)) as c:
            self.refs = []
            for ids in self.windows:
                self.refs.append(self.sim.forward(ids)[0])
                c.advance()
        self.units = self._rank(divergence, progress)

    def _rank(self, divergence, progress) -> list[dict]:
        modules = dict(self.loaded.model.named_modules())
        found = divergence.units(self.loaded.family, self.sim.schemes)
        rows = []
        with task(progress, f"mixed precision: {len(found)} units quantized one at a time", total=len(found)) as c:
            for unit in found:
                self.sim.enable(unit.modules)
                windows = self.windows[:RANK_WINDOWS]
                scores = divergence._scores(self.refs, [self.sim.forward(ids)[0] for ids in windows], windows)
                extra = sum(self._extra_bytes(modules[m], m) for m in unit.modules)
                rows.append({"unit": unit.name, "part": unit.part, "modules": list(unit.modules),
                             "kl": scores["kl"], "top1_agreement": scores["top1_agreement"],
                             "ppl_rel_change": scores["ppl_rel_change"], "extra_bytes": int(extra)})
                c.advance()
        self.sim.disable()
        # KL bought back per megabyte added (plus one, so units that cost no size rank by KL alone): the
        # smallest artifact that meets the budget keeps the units that buy the most per byte.
        return sorted(rows, key=lambda r: -r["kl"] / (r["extra_bytes"] / 2 ** 20 + 1.0))

    def _extra_bytes(self, module, name: str) -> float:
        base, kept = self.base.get(name), self.kept.get(name)

        def size(scheme):
            if scheme is None or scheme.bits is None:
                return _BYTES["float"]
            return _BYTES["int4" if scheme.bits == 4 else "int8"]

        return max(0.0, module.weight.numel() * (size(kept) - size(base)))

    def estimate(self, k: int) -> dict:
        """The simulation's top-1 / ppl change (calibration windows) with the top ``k`` units kept."""
        from . import divergence

        kept = {m for u in self.units[:k] for m in u["modules"]}
        self.sim.replace({n: (self.kept[n] if n in kept else self.base[n]) for n in self.base})
        self.sim.enable()
        outs = [self.sim.forward(ids)[0] for ids in self.windows]
        self.sim.disable()
        return divergence._scores(self.refs, outs, self.windows)

    def smallest(self, budget: Budget, ratio: dict, start: int = 0,
                 progress: Callable[[str], None] = lambda m: None) -> int:
        """The smallest k >= ``start`` whose estimate, scaled by ``ratio`` (``error_ratio``), meets
        ``budget`` (binary search: keeping more never costs accuracy in the simulation, near enough);
        len(units) when none does."""
        lo, hi = start, len(self.units)
        while lo < hi:
            mid = (lo + hi) // 2
            guess = predicted(self.estimate(mid), ratio)
            progress(f"mixed precision: {mid} units kept, estimated top-1 {guess['top1_agreement']:.4f}, "
                     f"ppl change {guess['ppl_rel_change'] * 100:.2f}%")
            if budget.misses(guess):
                lo = mid + 1
            else:
                hi = mid
        return lo


# Added to both errors before a ratio is taken, so a near-zero simulated error (a tiny model, or most
# layers kept) does not make the ratio explode: 0.1% of perplexity, 0.001 of top-1.
_SMOOTHING = 1e-3


def _errors(metrics: dict) -> dict:
    return {"top1_agreement": 1.0 - metrics["top1_agreement"], "ppl_rel_change": abs(metrics["ppl_rel_change"])}


def error_ratio(measured: dict, estimate: dict) -> dict:
    """Per figure, the real gate's error (evaluation text) over the simulation's (calibration text) at one plan."""
    real, sim = _errors(measured), _errors(estimate)
    return {k: (real[k] + _SMOOTHING) / (sim[k] + _SMOOTHING) for k in real}


def predicted(estimate: dict, ratio: dict) -> dict:
    """The gate's figures predicted from a simulated ``estimate``: its errors scaled by ``ratio``."""
    err = {k: max(0.0, (e + _SMOOTHING) * ratio[k] - _SMOOTHING) for k, e in _errors(estimate).items()}
    return {"top1_agreement": 1.0 - err["top1_agreement"], "ppl_rel_change": err["ppl_rel_change"]}


def fit(loaded, fmt: str, recipe: str, group_size: int, spec: dict, metrics: dict, budget: Budget,
        rebuild: Callable[[list], dict], progress: Callable[[str], None] = lambda m: None) -> dict:
    """Search the smallest mixed plan meeting ``budget``; return the manifest's "mixed_precision" section.

    ``metrics`` are the gate's figures of the plan as it is; ``rebuild(rules)`` builds and validates the
    artifact under those override rules and returns its gate metrics. The last rebuild is left in place.
    """
    record = {"budget": budget.as_dict(), "plan": _figures(metrics), "rounds": []}
    started, rebuilding = time.perf_counter(), 0.0

    def timed_rebuild(rules: list) -> dict:
        nonlocal rebuilding
        t0 = time.perf_counter()
        try:
            return rebuild(rules)
        finally:
            rebuilding += time.perf_counter() - t0
            record["search_s"] = round(time.perf_counter() - started - rebuilding, 1)

    if not budget.misses(metrics):
        record["result"] = "the recipe's plan meets the budget; nothing kept finer"
        return record
    search = Search(loaded, fmt, recipe, group_size, spec, progress)
    record["keep"] = search.keep.describe(group_size)
    record["ranking"] = [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in u.items() if k != "modules"}
                         for u in search.units]
    ratio, k, measured = error_ratio(metrics, search.estimate(0)), 0, metrics
    for _ in range(MAX_ROUNDS):
        if k >= len(search.units):
            break
        k = search.smallest(budget, ratio, start=k + 1, progress=progress)
        chosen = search.units[:k]
        estimate = search.estimate(k)
        progress(f"mixed precision: rebuilding with {k} of {len(search.units)} units kept "
                 f"({search.keep.describe(group_size)})")
        measured = timed_rebuild(overrides(chosen, search.keep))
        record["rounds"].append({"kept": k, "units": [u["unit"] for u in chosen], "estimate": _figures(estimate),
                                 "predicted": _figures(predicted(estimate, ratio)), "measured": _figures(measured)})
        if not budget.misses(measured):
            record.update(result="met", kept=[u["unit"] for u in chosen],
                          extra_bytes=sum(u["extra_bytes"] for u in chosen))
            return record
        ratio = error_ratio(measured, estimate)
    record.update(result="not met", kept=[u["unit"] for u in search.units[:k]])
    raise BudgetNotMet(record, budget.misses(measured))


def _figures(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 6) for k in ("top1_agreement", "top5_agreement", "ppl_rel_change")
            if k in metrics}


class BudgetNotMet(SlmExportError):
    """No mixed plan of the recipe's family met the accuracy budget (the record says what was tried)."""

    exit_code = 3  # as a failed parity gate

    def __init__(self, record: dict, misses: list[str]):
        rounds = "; ".join(f"{r['kept']} kept: top-1 {r['measured'].get('top1_agreement', 0):.4f}, ppl "
                           f"{r['measured'].get('ppl_rel_change', 0):+.2%}" for r in record["rounds"])
        super().__init__(f"the accuracy budget was not met ({'; '.join(misses)}) after {len(record['rounds'])} "
                         f"rebuilds ({rounds or 'none'})",
                         hint="nothing was written; loosen --max-ppl-change / --min-top1, or use a finer recipe")
        self.record = record
