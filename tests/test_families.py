"""Every model family on every format, on its tiny config: roles, export, parity against PyTorch.

The matrix is ``exporter.families.TEST_MATRIX`` (what `slm-export models` reports as covered). fp32 on
ONNX and TFLite is the fast tier; the quantized recipes and ExecuTorch lowering are behind ``slow``.
A family a format refuses must be refused before any work, with the family's reason.
"""

from __future__ import annotations

import pytest
import torch

from exporter import parity
from exporter.errors import UnsupportedRecipeError
from exporter.families import FAMILIES, ROLES, TEST_MATRIX
from exporter.formats import ExportOptions, get_format
from exporter.runtime.base import open_runner

FAMILY_NAMES = sorted(f.name for f in FAMILIES)
CELLS = [(fam, fmt, recipe) for fam in FAMILY_NAMES for fmt, recipes in TEST_MATRIX.items() for recipe in recipes]


def _param(fam, fmt, recipe):
    slow = recipe != "fp32" or fmt == "pte"
    return pytest.param(fam, fmt, recipe, marks=[pytest.mark.slow] if slow else [], id=f"{fam}-{fmt}-{recipe}")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_linear_layer_has_a_role(name, tiny_loaded):
    """The family's role patterns cover its model: every linear layer has a role, the plan's key roles exist."""
    fam = FAMILIES.get(name)
    loaded = tiny_loaded(name)
    assert loaded.family is fam and loaded.kind == fam.kind
    roles = {}
    for path, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            roles[path] = fam.role_of(path)
    unassigned = [p for p, r in roles.items() if r is None and not p.endswith(("pooler.dense",))]
    if name == "mobilebert":  # bottleneck and stacked-FFN linears have no role of the shared vocabulary
        unassigned = [p for p in unassigned if "bottleneck" not in p and ".ffn." not in p
                      and "embedding_transformation" not in p]
    assert not unassigned, f"{name}: linears without a role: {unassigned[:5]}"
    found = set(roles.values())
    assert "down" in found and ({"q", "k", "v"} <= found or "qkv" in found), found
    assert fam.num_layers(loaded.model) == loaded.config.get_text_config().num_hidden_layers
    assert fam.modules(loaded.model, "embed"), f"{name}: no embedding module matched"
    if fam.kind == "causal-lm":
        assert fam.role_of("lm_head") == "lm_head"
    assert set(fam.layer_roles) | set(fam.model_roles) <= set(ROLES)


@pytest.mark.parametrize("fam, fmt, recipe", [_param(*c) for c in CELLS])
def test_family_exports_and_matches_pytorch(fam, fmt, recipe, tiny_loaded, tmp_path):
    """Export the tiny model and check parity with the recipe's own thresholds (the gate users get)."""
    loaded = tiny_loaded(fam)
    family = FAMILIES.get(fam)
    format_ = get_format(fmt)
    reason = family.refusal(fmt)
    options = ExportOptions(max_context=128, prefill_lengths=(16,))
    if reason:
        with pytest.raises(UnsupportedRecipeError, match="cannot export the"):
            format_.check(loaded.kind, recipe, family)
        return
    art = format_.build(loaded, recipe, options, tmp_path)
    runner = open_runner(tmp_path, art.spec, verify_files=False)
    result = parity.evaluate(loaded, runner, recipe, window=48, max_windows=2, greedy_tokens=8)
    assert result["passed"], (result["failures"], {k: v for k, v in result["metrics"].items()
                                                    if not isinstance(v, str)})
