"""The ONNX recipe family: onnxruntime's own quantization and float16 tools, one function per recipe."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from exporter import source_grid
from exporter.errors import UnsupportedRecipeError
from exporter.texts import calibration_windows

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Gather")


def _scopes(node) -> list[str]:
    """The ``name_scopes`` metadata of a node of the dynamo exporter: module paths outermost first,
    ending with the op's own name: ``['', 'model', ..., 'model.model.layers.0.mlp.down_proj', 'linear_6']``."""
    import ast

    text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return scopes if isinstance(scopes, list) else []


def source_plan(loaded, recipe: str, group_size: int):
    """The source-grid plan of an int4-weight causal-LM export (``exporter.source_grid``), or None."""
    if recipe != "int4-weight" or loaded.kind != "causal-lm":
        return None
    return source_grid.plan_for_format(loaded.model, loaded.family, recipe, "onnx", group_size)


def _module_path(node) -> str:
    scopes = _scopes(node)
    return str(scopes[-2]) if len(scopes) >= 2 else ""


def _nodes_of_modules(model_path: Path, nodes: list[str], modules: list[str]) -> list[str]:
    """Those of the MatMul ``nodes`` whose module path ends with one of ``modules`` (the exporter's
    wrapper adds a prefix such as "model.")."""
    import onnx

    wanted = set(nodes)
    suffixes = tuple("." + m for m in modules)
    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node
            if n.name in wanted and (_module_path(n) in modules or _module_path(n).endswith(suffixes))]


def planned_nodes(model_path: Path, recipe: str, family) -> dict[str, list[str]]:
    """The graph's MatMul/Gemm/Gather node names grouped by what the recipe's onnx plan gives them.

    Keys are (weights, granularity, activations) strings such as "int8/channel/dynamic"; "float"
    holds the nodes no rule takes. A Gather counts only as an embedding lookup (role "embed"); a
    MatMul/Gemm as a linear layer ("*" takes it) only when it comes from an nn.Linear, i.e. its scope
    ends in a linear op, not attention's activation x activation products.
    """
    import onnx

    from exporter.recipes import get_recipe

    plan = get_recipe(recipe)
    groups: dict[str, list[str]] = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        scopes = _scopes(node)
        path = scopes[-2] if len(scopes) >= 2 else ""
        if path.endswith("." + source_grid.OFFSETS):
            continue  # a carried source grid's float block-offset term (exporter/source_grid.py)
        role = family.role_of(path) if family and path else None
        if node.op_type == "Gather":
            if role != "embed":
                continue
            is_linear = False
        elif scopes and re.fullmatch(r"linear(_\d+)?", str(scopes[-1])):
            is_linear = True
        else:
            continue  # attention's activation x activation products are no layer of the plan
        rule = plan.rule_for("onnx", role, is_linear, family.kind if family else None, path)
        key = "float" if rule is None or rule.weights == "float" else f"{rule.weights}/{rule.granularity}/{rule.activations}"
        groups.setdefault(key, []).append(node.name)
    return groups


def apply(recipe: str, src: Path, dst: Path, loaded, options, spec: dict, source=None) -> list[str]:
    """Write ``src`` quantized with ``recipe`` to ``dst``; return notes for the report. ``spec`` is the
    build's runtime.json, whose contract names the graph's tensors (for calibration feeds); ``source``
    the int4 source-grid plan (``source_plan``) the graph was exported with."""
    return _RECIPES[recipe](src, dst, loaded, options, spec, source) or []


def _refuse_unplanned(groups: dict, allowed: set[str], recipe: str) -> None:
    extra = sorted(set(groups) - allowed - {"float"})
    if extra:
        raise UnsupportedRecipeError(f"the onnx plan of {recipe} asks for {', '.join(extra)}, which this format's "
                                     "quantizer does not implement", hint="see `slm-export recipes --explain`")


def _fp16(src: Path, dst: Path, loaded, options, spec: dict, source=None):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: inputs, outputs and the KV cache stay float32 so runners need no change;
    # onnxconverter_common's converter produced graphs that fail to load on Llama (TOOLCHAIN.md).
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, str(dst))
    return ["fp16 weights and compute; float32 inputs, outputs and KV cache"]


def _int8_dynamic(src: Path, dst: Path, loaded, options, spec: dict, source=None):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Linears: 8-bit blockwise MatMulNBits (symmetric int8 weights, one scale per block of
    # ``--group-size`` input weights). The plan's "dynamic" rules run at accuracy_level 4: onnxruntime
    # quantizes the activations to int8 per block of the same size at run time and computes in int8,
    # the Q8_0 scheme of llama.cpp. Its "float" rules run at accuracy_level 0 (weight-only, float
    # compute). quantize_dynamic's MatMulInteger, used before, scales activations per *tensor*:
    # SmolLM2 top-1 0.828 / ppl +7.6% and half the fp32 decode speed (see README, "Measured").
    # Embedding tables (Gather) stay with quantize_dynamic's int8 Gather: the installed MatMulNBits
    # quantizer writes GatherBlockQuantized at 4 bits only.
    groups = planned_nodes(src, "int8-dynamic", loaded.family)
    _refuse_unplanned(groups, {"int8/group/dynamic", "int8/group/float", "int8/channel/float"}, "int8-dynamic")
    gemms = _nodes_of_type(src, "Gemm")
    blockwise = [n for n in groups.get("int8/group/dynamic", []) if n not in gemms]
    weight_only = [n for n in groups.get("int8/group/float", []) if n not in gemms]
    # A linear exported as Gemm (a 2-D input, e.g. a classifier head) has no MatMulNBits form: it keeps
    # quantize_dynamic's per-channel int8 weights (unsigned, U8U8: signed weights saturate on AVX2-only
    # x86 CPUs, see README) with per-tensor dynamic activations.
    dynamic = [n for n in groups.get("int8/group/dynamic", []) + groups.get("int8/group/float", []) if n in gemms]
    embeddings = groups.get("int8/channel/float", [])
    staged = dst.with_name(dst.name + ".emb")
    try:
        if embeddings or dynamic:  # an empty nodes_to_quantize would mean "every node" to quantize_dynamic
            quantize_dynamic(str(src), str(staged), per_channel=True, weight_type=QuantType.QUInt8,
                             op_types_to_quantize=["Gather", "Gemm"], nodes_to_quantize=embeddings + dynamic)
        else:
            staged = src
        _matmul_nbits(staged, dst, bits=8, block_size=options.group_size, groups=[(weight_only, 0), (blockwise, 4)])
    finally:
        if staged != src:
            staged.unlink(missing_ok=True)
    notes = [f"{len(blockwise)} linears: 8-bit MatMulNBits, weights in blocks of {options.group_size}, int8 "
             f"compute on activations quantized per block (accuracy_level 4)"]
    if weight_only:
        notes.append(f"{len(weight_only)} linears: 8-bit MatMulNBits weights, float activations (accuracy_level 0)")
    if embeddings:
        notes.append(f"{len(embeddings)} embedding tables: int8 (Gather)")
    if dynamic:
        notes.append(f"{len(dynamic)} Gemm linears: int8 per-channel weights, per-tensor dynamic int8 activations")
    return notes


def _nodes_of_type(model_path: Path, op_type: str) -> set[str]:
    """Names of the ``op_type`` nodes of the graph at ``model_path`` (weights not loaded)."""
    import onnx

    return {n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type == op_type}


def _weight_only(src: Path, dst: Path, bits: int, block_size: int, nodes: list[str] | None = None,
                 accuracy_level: int = 0) -> None:
    """MatMulNBits quantization of exactly the MatMul ``nodes`` (all constant-weight MatMuls when None)."""
    _matmul_nbits(src, dst, bits, block_size, [(nodes, accuracy_level)])


def _matmul_nbits(src: Path, dst: Path, bits: int, block_size: int,
                  groups: list[tuple[list[str] | None, int]]) -> None:
    """MatMulNBits-quantize each group of (MatMul nodes, accuracy_level) in turn on one loaded model,
    saved once. Nodes None: every constant-weight MatMul; an empty group is skipped."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model, quantizer = onnx.load(str(src)), None
    for nodes, accuracy_level in groups:
        if nodes is not None and not nodes:
            continue
        # nodes_to_include does not restrict the quantizer (it takes a node that is included OR of a
        # quantized op type, MatMul by default): every other MatMul is excluded explicitly, so layers the
        # plan keeps float (or gives another accuracy level) stay as they are.
        wanted = set(nodes or ())
        exclude = [] if nodes is None else [n.name for n in model.graph.node
                                            if n.op_type == "MatMul" and n.name not in wanted]
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                              accuracy_level=accuracy_level, bits=bits)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_include=nodes, nodes_to_exclude=exclude)
        quantizer.process()
        model = quantizer.model.model
    if quantizer is None:
        onnx.save(model, str(dst))
    else:
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _int8_static(src: Path, dst: Path, loaded, options, spec: dict, source=None):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if loaded.kind != "causal-lm":
        raise UnsupportedRecipeError("int8-static for ONNX is implemented for causal LMs only")
    reader = _CalibrationReader(loaded, options, spec)
    groups = planned_nodes(src, "int8-static", loaded.family)
    _refuse_unplanned(groups, {"int8/channel/static", "int8/group/float"}, "int8-static")
    static, weight_only = groups.get("int8/channel/static", []), groups.get("int8/group/float", [])
    staged = dst.with_name(dst.name + ".qdq")
    # Only the plan's linears are quantized: the additive attention mask (finfo.min) and softmax stay
    # float, since their ranges would wreck a per-tensor int8 scale.
    quantize_static(
        str(src), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
        nodes_to_quantize=static, extra_options={"ActivationSymmetric": True, "MatMulConstBOnly": True},
    )
    try:
        _weight_only(staged, dst, bits=8, block_size=options.group_size, nodes=weight_only)
    finally:
        staged.unlink(missing_ok=True)
    return [f"QDQ int8 weights and activations on {len(static)} linears, calibrated on {reader.count} windows of "
            f"{reader.window} tokens",
            f"{len(weight_only)} MLP output projections: int8 weights, float activations (activation outliers)"]


def _int4_weight(src: Path, dst: Path, loaded, options, spec: dict, source=None):
    groups = planned_nodes(src, "int4-weight", loaded.family)
    _refuse_unplanned(groups, {"int4/group/dynamic"}, "int4-weight")
    nodes = groups.get("int4/group/dynamic", [])
    # A source's 4-bit blocks (``source_grid``) go through the same symmetric RTN quantizer: every block
    # holds the code -8 and no larger magnitude, and MatMulNBits' RTN maps that to the block's scale, so
    # it writes the source's codes and scales as they are. Linears the source holds finer get 8 bits.
    finer = _nodes_of_modules(src, nodes, source.finer) if source else []
    four = [n for n in nodes if n not in set(finer)]
    # accuracy_level 4: int8 compute on blocks of activations, the fast path of MatMulNBits on CPU.
    staged = dst.with_name(dst.name + ".q8") if finer else dst
    _weight_only(src, staged, bits=4, block_size=options.group_size, accuracy_level=4, nodes=four)
    if finer:
        try:
            _weight_only(staged, dst, bits=8, block_size=options.group_size, accuracy_level=4, nodes=finer)
        finally:
            staged.unlink(missing_ok=True)
    notes = [f"{len(four)} linears: 4-bit MatMulNBits weights, block {options.group_size}, int8 compute "
             f"(accuracy_level 4); {len(groups.get('float', []))} stay float (lm_head)"]
    if finer:
        notes.append(f"{len(finer)} linears: 8-bit MatMulNBits (the source holds them at more than 4 bits)")
    return notes


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over token windows of the calibration text, empty past."""

    def __init__(self, loaded, options, spec: dict, window: int = 64):
        from exporter.runtime.spec import roles

        names = roles(spec)
        self.window = window
        windows = calibration_windows(loaded.tokenizer, options.calibration_texts, window,
                                      options.calibration_samples)
        if not windows:
            raise UnsupportedRecipeError("int8-static needs calibration text; none was given")
        self.count = len(windows)
        empty = np.zeros((1, spec["num_kv_heads"], 0, spec["head_dim"]), np.float32)
        self._feeds = iter([
            {
                names["tokens"]: np.asarray([w], np.int64),
                names["mask"]: np.ones((1, len(w)), np.int64),
                names["positions"]: np.arange(len(w), dtype=np.int64)[None],
                **{name: empty for name in spec["cache"]["inputs"]},
            }
            for w in windows
        ])

    def get_next(self):
        return next(self._feeds, None)


_RECIPES = {  # recipe -> fn(src, dst, loaded, options, spec, source plan or None) -> notes
    "fp16": _fp16,
    "int8-dynamic": _int8_dynamic,
    "int8-static": _int8_static,
    "int4-weight": _int4_weight,
}


def simulated_schemes(recipe: str, loaded, group_size: int, spec: dict) -> dict:
    """module path -> ``exporter.simulate.Scheme``: this format's quantization of ``recipe``, layer by layer.

    MatMulNBits at accuracy_level 4 quantizes its input to int8 per block of the weights' block size
    (symmetric) at run time; int8-dynamic's embedding is quantize_dynamic's int8 Gather, one range per table.
    """
    from exporter import simulate

    if recipe == "fp32":
        return {}
    if recipe == "fp16":
        return simulate.half_schemes(loaded)
    if recipe == "int8-dynamic":
        return simulate.plan_schemes(recipe, "onnx", loaded, group_size, "block", eight_group=group_size,
                                     embed=simulate.Scheme(8, per_tensor=True), rounding="signed-max")
    if recipe == "int4-weight":
        return simulate.plan_schemes(recipe, "onnx", loaded, group_size, "block", eight_group=group_size,
                                     source=spec.get("source_grid"), rounding="signed-max")
    raise NotImplementedError(f"onnx {recipe} (calibrated activation ranges) is not simulated")
