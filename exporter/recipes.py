"""The shared recipe vocabulary: what each recipe means and how close to the reference it must stay.

Recipes are data. A format says which recipe names it implements (see ``exporter.formats``);
the *meaning* of a name and its parity thresholds live here, so every format, target and report agrees.

Thresholds are checked by ``exporter.parity`` on a real English text (``exporter/data``).
The measured figures beside them are SmolLM2-135M-Instruct on that text (see README, "Measured").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field

from .registry import Registry


@dataclass(frozen=True)
class Thresholds:
    """Parity limits a recipe must hold; ``None`` means the metric is reported but not gated."""

    max_abs_err: float | None = None  # max |logit_ref - logit_art| over every position and vocab entry
    top1_min: float | None = None  # fraction of positions whose argmax token agrees
    top5_min: float | None = None  # mean overlap of the two top-5 sets (|A & B| / 5)
    ppl_rel_change_max: float | None = None  # |ppl_art / ppl_ref - 1|
    greedy_identical: bool = False  # greedy tokens of the artifact must equal the reference's
    encoder_cosine_min: float | None = None  # encoders: min cosine similarity of hidden states per token
    label_agreement_min: float | None = None  # classifiers: fraction of texts whose predicted label agrees

    def failures(self, metrics: dict) -> list[str]:
        """Human-readable reasons ``metrics`` misses these thresholds (empty when it passes)."""
        out = []
        if "label_agreement" in metrics:  # a classifier: its decisions (logits over a few labels)
            if self.label_agreement_min is not None and not metrics["label_agreement"] >= self.label_agreement_min:
                out.append(f"label_agreement {metrics['label_agreement']:.4f} < {self.label_agreement_min:g}")
            return out
        if "cosine_min" in metrics:  # an encoder: hidden states, not logits
            if self.encoder_cosine_min is not None and not metrics["cosine_min"] >= self.encoder_cosine_min:
                out.append(f"cosine_min {metrics['cosine_min']:.5f} < {self.encoder_cosine_min:g}")
            return out
        if self.max_abs_err is not None and not metrics["max_abs_err"] <= self.max_abs_err:
            out.append(f"max_abs_err {metrics['max_abs_err']:.4g} > {self.max_abs_err:g}")
        if self.top1_min is not None and not metrics["top1_agreement"] >= self.top1_min:
            out.append(f"top1_agreement {metrics['top1_agreement']:.4f} < {self.top1_min:g}")
        if self.top5_min is not None and not metrics["top5_agreement"] >= self.top5_min:
            out.append(f"top5_agreement {metrics['top5_agreement']:.4f} < {self.top5_min:g}")
        if self.ppl_rel_change_max is not None and not (
            abs(metrics["ppl_rel_change"]) <= self.ppl_rel_change_max
        ):
            out.append(f"ppl_rel_change {metrics['ppl_rel_change']:+.4f} exceeds ±{self.ppl_rel_change_max:g}")
        if self.greedy_identical and metrics.get("greedy_identical") is False:
            out.append(
                f"greedy tokens differ from the reference at step {metrics.get('greedy_first_diff')}"
            )
        return out


WEIGHTS = ("float", "int8", "int4")
GRANULARITIES = ("channel", "group")  # per output channel, or groups of ``--group-size`` input weights
ACTIVATIONS = ("float", "dynamic", "static")  # float; int8 quantized at run time; int8 with calibrated ranges


@dataclass(frozen=True)
class Rule:
    """One line of a quantization plan: which layers it matches and what their weights and inputs get.

    ``match`` is a role of ``exporter.families`` ("down", "lm_head", "embed", ...) or "*" (every linear
    layer no earlier rule took). Plans are first-match lists, as ExecuTorch's LLM ``QuantRecipe``.
    """

    match: str
    weights: str
    granularity: str = "channel"
    activations: str = "float"
    why: str = ""
    kind: str | None = None  # only for models of this kind ("causal-lm" / "encoder"); None: every kind
    # Only these module paths, whatever their role: the layers mixed precision keeps finer than the
    # plan (exporter/mixed_precision.py); empty for the plan's own, role-matched rules.
    modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weights not in WEIGHTS or self.granularity not in GRANULARITIES or self.activations not in ACTIVATIONS:
            raise ValueError(f"bad rule {self}")

    def matches(self, role: str | None, is_linear: bool, kind: str | None = None, path: str | None = None) -> bool:
        """Whether this rule takes the module at ``path`` of ``role`` (``is_linear``: an nn.Linear, which "*"
        takes) in a model of ``kind``."""
        if self.modules:  # exact, or under an exporter's wrapper module ("model." + the path)
            return path is not None and any(path == m or path.endswith("." + m) for m in self.modules)
        if self.kind is not None and kind is not None and kind != self.kind:
            return False
        return role == self.match if self.match != "*" else is_linear

    def as_dict(self) -> dict:
        """The rule as runtime.json records it (``from_dict`` reads it back)."""
        return {**dataclasses.asdict(self), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(**{**d, "modules": tuple(d.get("modules", ()))})

    def describe(self, group_size: int | None = None) -> str:
        if self.weights == "float":
            return "float"
        only = f" ({self.kind} only)" if self.kind else ""
        gran = f"groups of {group_size or 'G'}" if self.granularity == "group" else "per channel"
        act = {"float": "float activations", "dynamic": "int8 dynamic activations",
               "static": "int8 static activations"}[self.activations]
        return f"{self.weights} weights {gran}, {act}{only}"


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe of the shared vocabulary: thresholds and, per format, a plan.

    ``plans`` maps a format name (or "*" for any format without its own) to the ordered rules that
    format's quantizer applies; layers no rule takes stay float. Each format maps its plan onto its
    own tool (torchao / pt2e, onnxruntime.quantization, ai-edge-quantizer) and refuses a rule it
    cannot express.
    """

    name: str
    description: str
    thresholds: Thresholds
    calibrated: bool = False  # needs calibration text (``--calibration FILE`` or the built-in sample)
    plans: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    # The limits for an artifact that carried a quantized source's blocks (runtime.json "source_grid",
    # exporter/source_grid.py): nothing is rounded twice there, so much less may be lost.
    source_grid_thresholds: Thresholds | None = None
    # Limits of one format where it measures far better than the others (onnx's 8-bit MatMulNBits against
    # LiteRT's per-channel int8): each format held to what it reaches, so its regression fails the gate
    # instead of hiding under the weakest format's limits.
    format_thresholds: dict[str, Thresholds] = field(default_factory=dict)
    # Per format (or "*"): what a layer that mixed precision keeps gets instead of its plan's rule
    # (``--max-ppl-change`` / ``--min-top1``, exporter/mixed_precision.py). A format not listed has no
    # finer step its quantizer can express for this recipe, and refuses a budget.
    keep: dict[str, Rule] = field(default_factory=dict)

    def thresholds_for(self, spec: dict | None) -> Thresholds:
        """The thresholds an artifact described by ``spec`` (its runtime.json) is held to."""
        spec = spec or {}
        if self.source_grid_thresholds is not None and spec.get("source_grid"):
            return self.source_grid_thresholds
        return self.format_thresholds.get(spec.get("format"), self.thresholds)

    def plan(self, fmt: str) -> tuple[Rule, ...]:
        """The rules ``fmt`` applies for this recipe (empty for float recipes), after the mixed-precision
        overrides in force (``overriding``)."""
        return _OVERRIDES.get() + self.plans.get(fmt, self.plans.get("*", ()))

    def rule_for(self, fmt: str, role: str | None, is_linear: bool = True, kind: str | None = None,
                 path: str | None = None) -> Rule | None:
        """The first rule of ``fmt``'s plan that takes the module at ``path`` of ``role`` in a ``kind`` model
        (None: float)."""
        return next((r for r in self.plan(fmt) if r.matches(role, is_linear, kind, path)), None)

    def keep_rule(self, fmt: str) -> Rule | None:
        """What mixed precision gives a layer it keeps finer in ``fmt`` (None: the format cannot)."""
        return self.keep.get(fmt, self.keep.get("*"))


# The per-module rules of a mixed-precision plan, put before every plan while an export (or its
# simulation) runs. A context variable rather than one more argument through every quantizer: the
# formats reach the plan from many places (graph node grouping, eager torchao passes, the source-grid
# plan, the simulation), and each one must see the same overrides.
_OVERRIDES: contextvars.ContextVar[tuple[Rule, ...]] = contextvars.ContextVar("plan_overrides", default=())


@contextlib.contextmanager
def overriding(rules):
    """Put ``rules`` (module-path rules, ``Rule.modules``) before every recipe's plan inside the block
    (and before the rules of an enclosing ``overriding``)."""
    token = _OVERRIDES.set(tuple(rules) + _OVERRIDES.get())
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def active_overrides() -> tuple[Rule, ...]:
    """The mixed-precision rules in force (empty outside ``overriding``)."""
    return _OVERRIDES.get()


RECIPES: Registry[Recipe] = Registry("recipe")


def _add(recipe: Recipe) -> None:
    RECIPES.register(recipe.name, recipe)


_add(Recipe(
    "fp32", "float32 weights and activations: the exported graph as traced",
    # measured SmolLM2 ONNX: max_abs_err ~1e-4, top1 1.0, greedy identical
    Thresholds(max_abs_err=5e-2, top1_min=0.995, top5_min=0.99, ppl_rel_change_max=0.002, greedy_identical=True,
               encoder_cosine_min=0.9999, label_agreement_min=1.0),
))
_add(Recipe(
    "fp16", "float16 weights and compute, float32 inputs/outputs",
    Thresholds(top1_min=0.95, top5_min=0.93, ppl_rel_change_max=0.02, encoder_cosine_min=0.999,
               label_agreement_min=0.98),
))
# Why the special rules, measured on SmolLM2-135M: the MLP down projection's input carries outlier
# channels that one per-tensor int8 scale cannot hold (ONNX int8: top-1 0.54 instead of 0.81), and its
# weights lose most at 4 bits (pte int4-weight: top-1 0.58 with them at 4 bits, 0.70 at 8); a 4-bit
# lm_head costs ~0.12 of top-1 agreement (0.48 with it at 4 bits on pte).
_DOWN_OUTLIERS = "activation outliers: a per-tensor int8 scale cannot hold them"
_DOWN_4BIT = "the most 4-bit-sensitive linear of a small LM"
_HEAD_4BIT = "4-bit lm_head costs ~0.12 of top-1 agreement"
# all-MiniLM-L6-v2 8da4w, min per-token cosine of hidden states: all 4-bit 0.904, down 8-bit 0.929,
# down + up 8-bit 0.970, everything 8-bit 0.997 (PyTorch simulation, 3 x 128 tokens).
_ENCODER_MLP = "an encoder's MLP at 4 bits drops min cosine to 0.93 (all-MiniLM-L6-v2)"
# A classifier's head is a few small linears that decide the label: 4 bits there buy nothing in size.
_HEAD = "a classifier's head decides the label and is tiny"

_ONNX_Q8 = "MatMulNBits 8-bit, accuracy_level 4: int8 activations per block, not per tensor"
# float32, not 8-bit MatMulNBits with float compute (accuracy_level 0 or 1): measured on this CPU, a 576 x 49152
# matvec took 273 ms that way against 12 ms as a float32 MatMul and 4 ms at accuracy_level 4 (SmolLM2 with
# its lm_head kept so decoded at 2.2-2.8 tok/s instead of 17).
_KEEP_ONNX = "kept float32 by the accuracy budget (MatMul)"

_add(Recipe(
    "int8-dynamic", "int8 weights (onnx: per block of --group-size; others: per channel), activations "
                    "quantized to int8 on the fly at run time",
    # Shared by every format, so set by the weakest real-model figures (2026-12-02, README "Measured"):
    # onnx (8-bit MatMulNBits) SmolLM2 top1 0.940 top5 0.947 ppl +0.7%; tflite SmolLM2 top1 0.875 ppl +1.2%,
    # Gemma-3-270M tflite top1 0.885 top5 0.902 ppl +2.6%. Before (per-tensor MatMulInteger): onnx SmolLM2
    # 0.823 / +7.2% and Gemma 0.81 / +10.9%, which these limits now reject. Greedy is not gated: SmolLM2's
    # first answer token is a near tie (logit margin 0.08), which any int8 scheme may flip.
    Thresholds(top1_min=0.85, top5_min=0.80, ppl_rel_change_max=0.05, encoder_cosine_min=0.98,
               label_agreement_min=0.95),
    # onnx on the evaluation set (8 x 128 tokens, top-1 known to about +-0.008; 2026-12-03): SmolLM2 top1
    # 0.944 top5 0.950 ppl +0.16%, Gemma-3-270M 0.9375 / 0.946 / +2.17%; the tiny test models 0.958-1.0.
    # tflite (per-channel int8 weights, per-tensor dynamic activations): SmolLM2 0.894 / 0.908 / +2.51%,
    # Gemma 0.8965 / 0.902 / +1.64%; tiny models 0.969-1.0. Each set about two to three standard errors
    # under the weaker model, so a real regression fails; pte (not a target's default) keeps the shared limits.
    format_thresholds={"onnx": Thresholds(top1_min=0.92, top5_min=0.92, ppl_rel_change_max=0.035,
                                          encoder_cosine_min=0.98, label_agreement_min=0.95),
                       "tflite": Thresholds(top1_min=0.87, top5_min=0.87, ppl_rel_change_max=0.04,
                                            encoder_cosine_min=0.98, label_agreement_min=0.95)},
    plans={
        # 8-bit MatMulNBits: int8 weights per block of --group-size, activations quantized per block of
        # the same size at run time (accuracy_level 4, int8 compute; the Q8_0 scheme), which holds the
        # down projections' outliers that one per-tensor scale (MatMulInteger, before) could not.
        # The embedding: quantize_dynamic's int8 Gather, which in fact scales the table per tensor (the
        # vocabulary has no "tensor" granularity); measured SmolLM2 top-1 0.940 with it, 0.938 float.
        "onnx": (Rule("embed", "int8", why="int8 embedding table (Gather; onnxruntime: one scale per table)"),
                 Rule("*", "int8", "group", "dynamic", _ONNX_Q8)),
        "*": (Rule("*", "int8", "channel", "dynamic"),),
    },
    # What --max-ppl-change / --min-top1 keep finer: float32 layers (see _KEEP_ONNX for why not 8-bit weights
    # with float activations on onnx).
    keep={"onnx": Rule("*", "float", why=_KEEP_ONNX)},
))
_add(Recipe(
    "int8-static", "int8 weights and activations, activation ranges calibrated on text",
    # measured SmolLM2: onnx QDQ top1 0.64 ppl +27.8% (MLP down projections float); tflite top1 0.76
    Thresholds(top1_min=0.60, top5_min=0.60, ppl_rel_change_max=0.35, encoder_cosine_min=0.95,
               label_agreement_min=0.9),
    calibrated=True,
    plans={
        "onnx": (Rule("down", "int8", "group", "float", _DOWN_OUTLIERS), Rule("*", "int8", "channel", "static")),
        # token-specific outliers at the down projection's input: per-token dynamic int8 there (0.40 -> 0.82)
        "tflite": (Rule("down", "int8", "channel", "dynamic", _DOWN_OUTLIERS),
                   Rule("embed", "int8", why="one int8 buffer for a tied embedding and head"),
                   Rule("*", "int8", "channel", "static")),
        "*": (Rule("*", "int8", "channel", "static"),),
    },
))
_add(Recipe(
    "int4-weight", "4-bit grouped weights (on XNNPACK: 8-bit dynamic activations + 4-bit weights)",
    # measured SmolLM2 (its weights are a dequantized Q4_1 GGUF, re-quantized): onnx top1 0.65 ppl +29%,
    # tflite top1 0.60, pte 8da4w top1 0.48 ppl +86% (fails: 4-bit lm_head, see README)
    Thresholds(top1_min=0.55, top5_min=0.50, ppl_rel_change_max=0.50, encoder_cosine_min=0.95,
               label_agreement_min=0.9),
    plans={
        "pte": (Rule("lm_head", "int8", "channel", "dynamic", _HEAD_4BIT),
                Rule("head", "int8", "channel", "dynamic", _HEAD),
                Rule("down", "int8", "channel", "dynamic", _DOWN_4BIT),
                Rule("up", "int8", "channel", "dynamic", _ENCODER_MLP, kind="encoder"),
                Rule("*", "int4", "group", "dynamic", "8da4w: XNNPACK's int4 kernels take int8 dynamic activations")),
        "onnx": (Rule("lm_head", "float", why=_HEAD_4BIT),
                 Rule("head", "float", why=_HEAD),
                 Rule("*", "int4", "group", "dynamic", "MatMulNBits, accuracy_level 4 (int8 compute)")),
        "tflite": (Rule("down", "int8", "channel", "dynamic", _DOWN_4BIT),
                   Rule("head", "int8", "channel", "dynamic", _HEAD),
                   Rule("*", "int4", "group", "dynamic", "ai-edge-quantizer blockwise int4 is a no-op weight-only")),
    },
    # A GGUF source's 4-bit blocks carried as they are (exporter/source_grid.py), measured 2026-12-02 (README,
    # "Measured", 3 windows): SmolLM2 onnx 0.958 / +0.6%, pte 0.875 / +1.8%; Gemma-3-270M onnx 0.974 / +0.5%,
    # pte 0.917 / +1.3%. On the 8-window evaluation set (2026-12-03): SmolLM2 pte top1 0.894 top5 0.909 ppl
    # +2.96%. What is left is the 8-bit dynamic activations (and XNNPACK's bf16 block scales). Greedy is not
    # gated: SmolLM2's first answer token is a near tie.
    source_grid_thresholds=Thresholds(top1_min=0.87, top5_min=0.87, ppl_rel_change_max=0.045,
                                      encoder_cosine_min=0.95, label_agreement_min=0.9),
    # What --max-ppl-change / --min-top1 keep finer: float32 (XNNPACK's fp32 linear; onnx: see _KEEP_ONNX). On
    # a carried source grid the loss is the int8 activations, which an 8-bit weight step would keep.
    keep={"onnx": Rule("*", "float", why=_KEEP_ONNX),
          "pte": Rule("*", "float", why="kept float32 by the accuracy budget")},
))
_add(Recipe(
    "int8-full", "all-integer int8 (int8 inputs/outputs), for microcontrollers",
    Thresholds(top1_min=0.60, encoder_cosine_min=0.9, label_agreement_min=0.85),
    calibrated=True,
    plans={"tflite": (Rule("*", "int8", "channel", "static", "all-integer: int8 inputs, outputs and kernels"),)},
))


def layer_rules(recipe: Recipe, fmt: str, family, model, embeddings: bool = True) -> dict[str, tuple]:
    """module path -> (role, rule or None, is_linear) for every nn.Linear (and nn.Embedding) of ``model``
    under ``recipe``'s ``fmt`` plan: the one place a plan meets a model's modules."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding) if embeddings else (torch.nn.Linear,)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        is_linear = isinstance(module, torch.nn.Linear)
        role = family.role_of(name) if family else None
        out[name] = (role, recipe.rule_for(fmt, role, is_linear, family.kind if family else None, name), is_linear)
    return out


def explain(recipe: Recipe, fmt: str, family, model, group_size: int = 32,
            source=None) -> list[tuple[str, str, str, str]]:
    """(module path, role, what it gets, why) for every linear and embedding layer of ``model``;
    ``source`` (an ``exporter.source_grid.SourcePlan``) marks the layers a quantized source changes."""
    carried = set(source.carried) if source else set()
    finer = set(source.finer) if source else set()
    rows = []
    for name, (role, rule, _) in layer_rules(recipe, fmt, family, model).items():
        if name in carried:
            rows.append((name, role or "-", f"int4 weights groups of {group_size}, the source's own blocks",
                         "on the source's 4-bit grid: carried exactly (codes, scales + float block offsets)"))
        elif name in finer:
            eight = f"groups of {group_size}" if fmt == "onnx" else "per channel"  # onnx: 8-bit MatMulNBits
            rows.append((name, role or "-", f"int8 weights {eight}",
                         "the source holds it at more than 4 bits: not rounded onto a coarser grid"))
        else:
            rows.append((name, role or "-", rule.describe(group_size) if rule else "float",
                         (rule.why or f"rule {rule.match!r}") if rule else "no rule takes it"))
    return rows


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (an unknown name is an error listing the known ones)."""
    return RECIPES.get(name)
