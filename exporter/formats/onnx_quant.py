"""The ONNX recipe family: onnxruntime's own quantization and float16 tools, one function per recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporter.errors import UnsupportedRecipeError
from exporter.recipes import MLP_DOWN_PROJECTIONS
from exporter.texts import calibration_windows


# The MLP output projections (exporter.recipes): their input carries outlier channels that a
# per-tensor int8 activation scale cannot hold: on SmolLM2-135M, quantizing it dropped top-1 agreement
# from 0.81 to 0.54 and raised perplexity by 79% instead of 6%. These stay float.
OUTLIER_PROJECTIONS = MLP_DOWN_PROJECTIONS


def outlier_nodes(model_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes that implement an ``OUTLIER_PROJECTIONS`` module.

    The dynamo exporter records each node's module path in its ``pkg.torch.onnx.name_scopes`` metadata.
    """
    import onnx

    names = []
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(f"{proj}'" in scopes for proj in OUTLIER_PROJECTIONS):
            names.append(node.name)
    return names


def apply(recipe: str, src: Path, dst: Path, loaded, options) -> list[str]:
    """Write ``src`` quantized with ``recipe`` to ``dst``; return notes for the report."""
    return _RECIPES[recipe](src, dst, loaded, options) or []


def _fp16(src: Path, dst: Path, loaded, options):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: inputs, outputs and the KV cache stay float32 so runners need no change;
    # onnxconverter_common's converter produced graphs that fail to load on Llama (TOOLCHAIN.md).
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, str(dst))
    return ["fp16 weights and compute; float32 inputs, outputs and KV cache"]


def _int8_dynamic(src: Path, dst: Path, loaded, options):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel int8 weights for MatMul/Gemm with constant weights and int8 embedding tables
    # (Gather); activations are quantized per call. Attention's activation x activation MatMuls stay
    # float. The outlier projections get int8 weights with float activations instead.
    # Weights are unsigned (U8U8), not signed (U8S8): on x86 CPUs without VNNI (AVX2 only) onnxruntime
    # runs U8S8 with VPMADDUBSW, whose int16 sums saturate (its docs say so). Measured on an AVX2-only
    # EPYC, tiny Llama: max |logit err| 1.66 with U8S8, 0.124 with reduce_range, 0.091 with U8U8 (the
    # figure VNNI machines give for U8S8). A bundle must not depend on the exporting machine's ISA.
    skip = outlier_nodes(src)
    staged = dst.with_name(dst.name + ".dyn")
    quantize_dynamic(str(src), str(staged), per_channel=True, weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_exclude=skip,
                     extra_options={"MatMulConstBOnly": True})
    try:
        _weight_only(staged, dst, bits=8, block_size=options.group_size, nodes=skip)
    finally:
        staged.unlink(missing_ok=True)
    return ["int8 per-channel weights and int8 embeddings, dynamic int8 activations",
            f"{len(skip)} MLP output projections: int8 weights, float activations (activation outliers)"]


def _weight_only(src: Path, dst: Path, bits: int, block_size: int, nodes: list[str] | None = None,
                 accuracy_level: int = 0) -> None:
    """MatMulNBits weight-only quantization of ``nodes`` (all constant-weight MatMuls when None)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    if nodes is not None and not nodes:
        onnx.save(model, str(dst))
        return
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_include=nodes)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _int8_static(src: Path, dst: Path, loaded, options):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if loaded.kind != "causal-lm":
        raise UnsupportedRecipeError("int8-static for ONNX is implemented for causal LMs only")
    reader = _CalibrationReader(loaded, options)
    skip = outlier_nodes(src)
    staged = dst.with_name(dst.name + ".qdq")
    # Only MatMul/Gemm are quantized: the additive attention mask (finfo.min) and softmax stay
    # float, since their ranges would wreck a per-tensor int8 scale.
    quantize_static(
        str(src), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=skip, extra_options={"ActivationSymmetric": True, "MatMulConstBOnly": True},
    )
    try:
        _weight_only(staged, dst, bits=8, block_size=options.group_size, nodes=skip)
    finally:
        staged.unlink(missing_ok=True)
    return [f"QDQ int8 weights and activations, calibrated on {reader.count} windows of {reader.window} tokens",
            f"{len(skip)} MLP output projections: int8 weights, float activations (activation outliers)"]


def _int4_weight(src: Path, dst: Path, loaded, options):
    # accuracy_level 4: int8 compute on blocks of activations, the fast path of MatMulNBits on CPU.
    _weight_only(src, dst, bits=4, block_size=options.group_size, accuracy_level=4)
    return [f"4-bit MatMulNBits weights, block {options.group_size}, int8 compute (accuracy_level 4)"]


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over token windows of the calibration text, empty past."""

    def __init__(self, loaded, options, window: int = 64):
        from exporter.formats import causal_lm_spec

        spec = causal_lm_spec(loaded, "onnx", "", "")
        self.window = window
        windows = calibration_windows(loaded.tokenizer, options.calibration_texts, window,
                                      options.calibration_samples)
        if not windows:
            raise UnsupportedRecipeError("int8-static needs calibration text; none was given")
        self.count = len(windows)
        empty = np.zeros((1, spec["num_kv_heads"], 0, spec["head_dim"]), np.float32)
        self._feeds = iter([
            {
                "input_ids": np.asarray([w], np.int64),
                "attention_mask": np.ones((1, len(w)), np.int64),
                "position_ids": np.arange(len(w), dtype=np.int64)[None],
                **{f"past_key_values.{i}.{kv}": empty for i in range(spec["num_layers"]) for kv in ("key", "value")},
            }
            for w in windows
        ])

    def get_next(self):
        return next(self._feeds, None)


_RECIPES = {
    "fp16": _fp16,
    "int8-dynamic": _int8_dynamic,
    "int8-static": _int8_static,
    "int4-weight": _int4_weight,
}
