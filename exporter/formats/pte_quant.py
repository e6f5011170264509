"""The ExecuTorch (XNNPACK) recipe family: how each shared recipe is produced for a ``.pte``.

Two quantization routes exist in ExecuTorch, and each recipe uses the one XNNPACK lowers well:

* eager, before ``torch.export``: ``fp16`` (cast the model) and ``int4-weight`` (torchao
  ``Int8DynamicActivationIntxWeightConfig`` with int4 grouped weights, "8da4w" - the recipe of
  ExecuTorch's own LLM export and of optimum-executorch);
* pt2e, on the exported graph: ``int8-dynamic`` and ``int8-static`` (ExecuTorch's
  ``XNNPACKQuantizer``; static is calibrated on text).

torchao ``IntxWeightOnlyConfig`` is deliberately absent: XNNPACK lowers it to garbage without
any error (see TOOLCHAIN.md); the parity gate test proves such output is rejected.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

EAGER_RECIPES = ("fp16", "int4-weight")
PT2E_RECIPES = ("int8-dynamic", "int8-static")


def linear_rules(model: torch.nn.Module, recipe: str, family) -> dict[str, object]:
    """module path -> the rule of ``recipe``'s pte plan that takes each nn.Linear (None: stays float)."""
    from exporter.recipes import get_recipe, layer_rules

    return {name: rule for name, (_, rule, _) in
            layer_rules(get_recipe(recipe), "pte", family, model, embeddings=False).items()}


def prepare_eager(model: torch.nn.Module, recipe: str, group_size: int, family=None):
    """Apply the eager part of ``recipe`` to ``model`` in place (a copy owned by the caller); return
    (model, the source-grid plan or None).

    int4-weight follows the recipe's pte plan (exporter/recipes.py): 4-bit grouped layers and 8-bit
    per-channel layers, both with 8-bit dynamic activations (torchao's 8da4w / 8da8w, which XNNPACK
    lowers); a layer whose group size does not divide its input width stays float32 (XNNPACK has no
    remainder group). Layers whose weights lie on a quantized source's 4-bit blocks keep them
    (``exporter.source_grid``): torchao's SYMMETRIC_NO_CLIPPING_ERR maps each block's -8 code to its
    scale exactly, where the default SYMMETRIC mapping (max / 7.5) would round every weight again.
    """
    if recipe == "fp16":
        return model.to(torch.float16), None
    if recipe != "int4-weight":
        return model, None
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quant_primitives import MappingType

    from exporter import source_grid

    rules = linear_rules(model, recipe, family)
    for name, rule in rules.items():
        if rule is not None and rule.weights != "float" and rule.activations != "dynamic":
            # IntxWeightOnlyConfig (float activations) lowers to garbage on XNNPACK (TOOLCHAIN.md).
            raise ValueError(f"the pte plan gives {name} {rule.describe(group_size)}; XNNPACK takes int4/int8 "
                             "weights only with int8 dynamic activations")
    eight = {name for name, r in rules.items() if r is not None and r.weights == "int8"}
    four = {name for name, r in rules.items() if r is not None and r.weights == "int4"}
    source = source_grid.plan_for_format(model, family, recipe, "pte", group_size)
    carried = set()
    if source is not None:
        source_grid.carry_plan(model, source)
        carried = set(source.carried)
        eight, four = (eight - carried) | set(source.finer), four - set(source.finer) - carried
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: fqn in eight and isinstance(m, torch.nn.Linear))
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in four and _groupable(m, group_size))
    exact = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                                                  weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)
    quantize_(model, exact, filter_fn=lambda m, fqn: fqn in carried)
    return model, source


def _groupable(module: torch.nn.Module, group_size: int) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features % group_size == 0


def _xnnpack_quantizer(static: bool):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    class HFSafeXNNPACKQuantizer(XNNPACKQuantizer):
        # The stock transform_for_annotation turns integer scalars into float tensors, which
        # breaks HF models (embedding indices, position ids). Nothing it does is needed here.
        def transform_for_annotation(self, model):
            return model

    quantizer = HFSafeXNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=not static))
    return quantizer


def pt2e_quantize(graph_module: torch.fx.GraphModule, recipe: str,
                  calibration: Iterable[tuple]) -> torch.fx.GraphModule:
    """Quantize an exported graph module with XNNPACK's pt2e quantizer, running ``calibration``.

    ``calibration`` yields positional argument tuples; for ``int8-dynamic`` one example run is
    enough (only weight observers need data), ``int8-static`` records activation ranges.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(graph_module, _xnnpack_quantizer(static=(recipe == "int8-static")))
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    return convert_pt2e(prepared)


def partitioners(recipe: str) -> list:
    """The XNNPACK partitioners that lower ``recipe``'s graph."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if recipe == "int8-dynamic":
        # pt2e's dynamically quantized linears partitioned one op at a time first: one big
        # partition forms a dependency cycle on Llama with a dynamic sequence dimension. The plain
        # partitioner then takes every float op left. (torchao's 8da4w int4-weight graph has no
        # such cycle, and one partitioner lowers it about twice as fast: fewer, larger delegates.)
        return [
            XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True),
            XnnpackPartitioner(),
        ]
    return [XnnpackPartitioner()]


def calibration_batches(windows: list[list[int]], make_args: Callable[[list[int]], tuple]) -> list[tuple]:
    """Positional-argument tuples for ``pt2e_quantize`` built with ``make_args`` per window."""
    return [make_args(w) for w in windows]


def simulated_schemes(recipe: str, loaded, group_size: int, spec: dict) -> dict:
    """module path -> ``exporter.simulate.Scheme``: this format's quantization of ``recipe``, layer by layer.

    XNNPACK quantizes a dynamic linear's input to int8 per row (token) at run time, in torchao's 8da4w /
    8da8w and pt2e's int8-dynamic alike; embeddings stay float; a 4-bit layer whose input width the
    group does not divide stays float (``prepare_eager``).
    """
    from exporter import simulate

    if recipe == "fp32":
        return {}
    if recipe == "fp16":
        return simulate.half_schemes(loaded)
    if recipe == "int8-dynamic":
        return {n: simulate.Scheme(8, None, "token", rounding="qmax") for n, m in loaded.model.named_modules()
                if isinstance(m, torch.nn.Linear)}
    if recipe == "int4-weight":
        schemes = simulate.plan_schemes(recipe, "pte", loaded, group_size, "token", source=spec.get("source_grid"))
        modules = dict(loaded.model.named_modules())
        return {n: s for n, s in schemes.items() if s.bits != 4 or s.exact or _groupable(modules[n], group_size)}
    raise NotImplementedError(f"pte {recipe} (calibrated activation ranges) is not simulated")
