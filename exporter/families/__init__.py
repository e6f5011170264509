"""Model families: everything slm-export knows about one architecture, in one file per family.

A family names its transformers ``model_type`` values, its kind (causal LM or encoder), the *roles*
of its modules as name patterns (q/k/v/o, gate/up/down, lm_head, embeddings, norms), which attention
and layer rewrites each format may use, what it needs specially, which formats cannot export it yet
(with the reason), and a tiny random config for tests. Formats and quantizers ask the family for
roles ("which linears are MLP down projections?") instead of listing module names of their own, so
adding a family is adding one file here that calls ``register(Family(...))``.

Roles are the shared vocabulary of quantization plans (``exporter.recipes``):

  embed, lm_head, final_norm                 outside the layers
  q, k, v, qkv (fused), o                    attention projections
  gate, up, gate_up (fused), down            MLP projections (down: the MLP output projection)
  attn_norm, mlp_norm, q_norm, k_norm        norms
  head                                       a classifier's head (pooler, classifier linears)

An encoder family also exports its sequence-classification models (``*ForSequenceClassification``
in config.architectures): the same layers with a ``head`` role, model kind ``sequence-classifier``
(``model_kind``), exported to logits over the labels and gated on label agreement.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from exporter.registry import Registry

KINDS = ("causal-lm", "encoder")  # a family's kind
CLASSIFIER = "sequence-classifier"  # the model kind of an encoder family's ...ForSequenceClassification
# Roles a quantization plan may name, in display order.
ROLES = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "lm_head",
         "attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm", "head")


@dataclass(frozen=True)
class Family:
    """One architecture family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    kind: str  # "causal-lm" | "encoder"
    description: str
    # Regex of the module path of one decoder/encoder layer; group 1 is the layer index.
    layers: str
    # role -> module path inside a layer (e.g. "down": "mlp.down_proj").
    layer_roles: dict[str, str]
    # role -> regex of a module path outside the layers (e.g. "lm_head": r"lm_head").
    model_roles: dict[str, str] = field(default_factory=dict)
    # (producer role, consumer roles) pairs SmoothQuant may rescale: the producer (a norm, or the
    # linear whose output feeds the consumers through an elementwise product) absorbs 1/s.
    smoothing: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Attention is plain causal softmax(q k^T * scale) v over the cache: ExecuTorch's llama::custom_sdpa fits.
    pte_custom_sdpa: bool = False
    # Llama-style RMSNorm and module-level rotate_half that exporter/formats/pte_layers.py rewrites.
    pte_linear_layers: bool = False
    # What the family needs beyond a Llama (shown by `slm-export models`; formats read the ones they use).
    special: tuple[str, ...] = ()
    # format -> why this family cannot be exported to it yet (refused before any work).
    refused: dict[str, str] = field(default_factory=dict)
    tiny_config: Callable[[], object] | None = None
    examples: str = ""  # real models of the family

    @cached_property
    def _layer_patterns(self) -> dict[str, re.Pattern]:
        return {role: re.compile(rf"(?:^|\.){self.layers}\.{re.escape(path)}$") for role, path in self.layer_roles.items()}

    @cached_property
    def _model_patterns(self) -> dict[str, re.Pattern]:
        return {role: re.compile(rf"(?:^|\.){pattern}$") for role, pattern in self.model_roles.items()}

    def role_of(self, module_path: str) -> str | None:
        """The role of the module at ``module_path`` (prefixes added by wrappers are allowed), or None."""
        for role, pattern in self._layer_patterns.items():
            if pattern.search(module_path):
                return role
        for role, pattern in self._model_patterns.items():
            if pattern.search(module_path):
                return role
        return None

    def layer_of(self, module_path: str) -> int | None:
        """The index of the layer ``module_path`` belongs to, or None outside the layers."""
        m = re.search(rf"(?:^|\.){self.layers}(?:\.|$)", module_path)
        return int(m.group(1)) if m else None

    def modules(self, model, role: str) -> list[tuple[str, object]]:
        """(path, module) of every module of ``model`` with ``role``."""
        return [(n, m) for n, m in model.named_modules() if n and self.role_of(n) == role]

    def num_layers(self, model) -> int:
        return len({self.layer_of(n) for n, _ in model.named_modules() if self.layer_of(n) is not None})

    def refusal(self, fmt: str) -> str | None:
        """Why this family cannot be exported to ``fmt`` (None when it can)."""
        return self.refused.get(fmt)


FAMILIES: Registry[Family] = Registry("model family", __name__)


def register(family: Family) -> Family:
    """Add ``family`` to the registry (called at import time by each family file)."""
    if family.kind not in KINDS:
        raise ValueError(f"family {family.name}: kind must be one of {KINDS}")
    unknown = (set(family.layer_roles) | set(family.model_roles)) - set(ROLES)
    if unknown:
        raise ValueError(f"family {family.name}: unknown roles {sorted(unknown)}")
    return FAMILIES.register(family.name, family)


def model_types() -> dict[str, Family]:
    """Every supported ``model_type`` and its family."""
    return {t: f for f in FAMILIES for t in f.model_types}


def model_kind(family: Family, config) -> str:
    """The kind of model to load: the family's, or ``sequence-classifier`` for an encoder family's
    classification architecture. A decoder-based classifier is refused (its head reads the last
    non-padding token's state, which no format exports yet)."""
    from exporter.errors import UnsupportedRecipeError

    classifier = any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
    if not classifier:
        return family.kind
    if family.kind != "encoder":
        raise UnsupportedRecipeError(
            f"{', '.join(config.architectures)}: sequence classification on a {family.name} decoder is not supported yet",
            hint="encoder classifiers (BERT, DistilBERT, MobileBERT) are; a causal LM exports as --model with its LM head")
    return CLASSIFIER


def family_for(config) -> Family:
    """The family of a transformers config (its text config for multimodal ones).

    An unsupported architecture is a ModelLoadError naming the closest supported model type and the
    whole list.
    """
    from exporter.errors import ModelLoadError

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    known = model_types()
    for mtype in (cfg.model_type, config.model_type):
        if mtype in known:
            return known[mtype]
    close = difflib.get_close_matches(config.model_type, list(known), n=1, cutoff=0.5)
    raise ModelLoadError(
        f"unsupported architecture {config.model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])})",
        hint=(f"the closest supported one is {close[0]!r}; " if close else "")
        + f"supported model types: {', '.join(sorted(known))} (`slm-export models` lists the families); "
        "a family is one file in exporter/families/",
    )


# What tests/test_families.py exports for every family on tiny configs (fast tier: fp32 on onnx and
# tflite; the rest behind the slow marker). `slm-export models` shows it, so the listing says what
# the test suite proves, not what we hope.
TEST_MATRIX = {
    "onnx": ("fp32", "int8-dynamic", "int4-weight"),
    "tflite": ("fp32", "int8-dynamic", "int4-weight"),
    "pte": ("fp32", "int4-weight"),
}


def coverage() -> dict[tuple[str, str], list[str]]:
    """(family, format) -> the recipes tests/test_families.py exports and checks for that family."""
    return {(f.name, fmt): list(recipes) for f in FAMILIES for fmt, recipes in TEST_MATRIX.items()
            if not f.refusal(fmt)}
