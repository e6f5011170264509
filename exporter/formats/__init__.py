"""Output formats: each file in this package implements one format and registers itself.

A format turns a loaded float32 PyTorch model into artifact files for one recipe, and writes the
``runtime.json`` that the matching device-side runner (``exporter/runtime/<format>_runner.py``) reads.
Quantization is part of ``build`` because where it happens differs per format: before lowering for
ExecuTorch (torchao / pt2e), after conversion for ONNX and TFLite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from exporter.errors import UnsupportedRecipeError
from exporter.registry import Registry


@dataclass
class ExportOptions:
    """Knobs shared by the formats; a format ignores what does not apply to it."""

    max_context: int = 512  # KV-cache length for static-cache formats (pte, tflite)
    prefill_lengths: tuple[int, ...] = (32, 128)  # fixed prefill signatures (tflite)
    group_size: int = 32  # weight group size of int4-weight
    calibration_texts: list[str] = field(default_factory=list)  # for calibrated recipes
    calibration_samples: int = 16  # how many token windows to calibrate on
    progress: Callable[[str], None] = lambda message: None  # stage messages for the CLI


@dataclass
class Artifact:
    """What a format wrote into the bundle's staging folder."""

    format: str
    recipe: str
    files: list[str]  # paths relative to the staging folder, the main artifact first
    spec: dict  # runtime.json: everything a device-side runner needs
    notes: list[str] = field(default_factory=list)  # what the user should know (fallbacks, skips)


class Format:
    """Base of every format; subclasses set the class attributes and implement ``build``."""

    name = ""
    description = ""
    recipes: tuple[str, ...] = ()  # recipe names of the shared vocabulary this format implements
    # Recipes of the vocabulary this format produces only through a target's own flow, with where.
    recipe_notes: dict[str, str] = {}
    kinds: tuple[str, ...] = ("causal-lm", "encoder", "sequence-classifier")

    def check(self, kind: str, recipe: str, family=None) -> None:
        """Refuse, before any work, a recipe, model kind or family this format cannot do."""
        if recipe not in self.recipes:
            where = self.recipe_notes.get(recipe)
            raise UnsupportedRecipeError(
                f"format {self.name!r} cannot do recipe {recipe!r} for this model"
                + (f" (it builds {recipe} only with {where})" if where else ""),
                hint=f"{self.name} recipes: {', '.join(self.recipes)}",
            )
        if kind not in self.kinds:
            raise UnsupportedRecipeError(f"format {self.name!r} cannot export {kind} models yet")
        reason = family.refusal(self.name) if family is not None else None
        if reason:
            raise UnsupportedRecipeError(f"format {self.name!r} cannot export the {family.name} family yet: {reason}",
                                         hint="try another --format (`slm-export models` shows what works)")

    def build(self, loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
        """Export ``loaded`` (an ``exporter.loading.LoadedModel``) with ``recipe`` into ``out_dir``."""
        raise NotImplementedError


FORMATS: Registry[Format] = Registry("format", __name__)


def register(fmt: Format) -> Format:
    """Add a format instance to the registry (called at import time by each format file)."""
    return FORMATS.register(fmt.name, fmt)


def get_format(name: str) -> Format:
    return FORMATS.get(name)


def causal_lm_spec(loaded, fmt: str, artifact: str, recipe: str, **extra) -> dict:
    """The runtime.json fields every causal-LM format shares (shapes, special tokens)."""
    cfg = loaded.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = text_cfg.num_attention_heads
    eos = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
    eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None and loaded.tokenizer.eos_token_id not in eos:
        eos.append(loaded.tokenizer.eos_token_id)
    spec = {
        "format": fmt,
        "kind": "causal-lm",
        "artifact": artifact,
        "recipe": recipe,
        "model_type": cfg.model_type,
        "vocab_size": int(text_cfg.vocab_size),
        "num_layers": int(text_cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(text_cfg, "num_key_value_heads", None) or n_heads),
        "head_dim": int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads),
        "bos_token_id": loaded.tokenizer.bos_token_id,
        "eos_token_ids": [int(e) for e in eos],
        "max_context": None,
    }
    spec.update(extra)
    return spec


def encoder_output(outputs, kind: str):
    """What an encoder graph returns: the last hidden states, or a classifier's label logits."""
    return outputs.logits if kind == "sequence-classifier" else outputs.last_hidden_state


def encoder_spec(loaded, fmt: str, artifact: str, recipe: str, **extra) -> dict:
    """The runtime.json fields of an encoder model (or an encoder's sequence classifier)."""
    spec = {
        "format": fmt,
        "kind": loaded.kind,
        "artifact": artifact,
        "recipe": recipe,
        "model_type": loaded.config.model_type,
        "hidden_size": int(loaded.config.hidden_size),
        "max_context": int(getattr(loaded.config, "max_position_embeddings", 512)),
    }
    if loaded.kind == "sequence-classifier":
        labels = getattr(loaded.config, "id2label", None) or {}
        spec["labels"] = [str(labels.get(i, i)) for i in range(int(loaded.config.num_labels))]
    spec.update(extra)
    return spec
