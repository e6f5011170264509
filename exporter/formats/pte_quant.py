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
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output")
PT2E_RECIPES = ("int8-dynamic", "int8-static")


def prepare_eager(model: torch.nn.Module, recipe: str, group_size: int) -> torch.nn.Module:
    """Apply the eager part of ``recipe`` to ``model`` in place (a copy owned by the caller)."""
    if recipe == "fp16":
        return model.to(torch.float16)
    if recipe == "int4-weight":
        from torchao.quantization import quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

        # 8-bit per-channel weights for the layers 4 bits hurt most, measured on SmolLM2-135M: the
        # output layer (top-1 0.48 with it at 4 bits; ONNX measured the same effect) and the MLP down
        # projections (top-1 0.58 -> 0.70, perplexity +47% -> +20%, for ~7% more bytes).
        eight_bit = {id(m) for fqn, m in model.named_modules() if eight_bit_layer(fqn)}
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  filter_fn=lambda m, _fqn: id(m) in eight_bit and isinstance(m, torch.nn.Linear))
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
        )
        # Only nn.Linear layers whose input width the group divides: a remainder group is not
        # supported by the XNNPACK kernel, and those few layers stay float32.
        quantize_(model, config, filter_fn=lambda m, _fqn: id(m) not in eight_bit and _groupable(m, group_size))
    return model


def eight_bit_layer(fqn: str) -> bool:
    """Whether int4-weight gives the layer at module path ``fqn`` 8-bit weights instead of 4."""
    from exporter.recipes import MLP_DOWN_PROJECTIONS

    return fqn.split(".")[-1] in OUTPUT_LAYER_NAMES or fqn.endswith(MLP_DOWN_PROJECTIONS)


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
