"""Faster XNNPACK lowering: graph rewrites of our own around ExecuTorch's lowering.

``static_view_shapes``: XNNPACK takes a reshape only when its target shape is made of integers, with
at most one ``-1``; transformers writes ``view(batch, seq, -1, head_dim)`` with the traced ``seq``
(a symbol), so with a dynamic sequence length every head split and merge of every attention layer
fell out of the delegate and split its partition. The same view with its one symbolic dim written
as ``-1`` and the ``-1`` as the number it stands for is the same reshape, and XNNPACK takes it.

``skip_inapplicable_passes``: lowering runs about thirty ExecuTorch passes, and each ends by re-tracing
the graph it was given with fake tensors, even when it changed nothing: XNNPACK's preprocessing runs
17 of them on every partition, edge-program generation nine on the whole program, ``to_executorch`` a
few more. A language model has no batch norm, convolution, PReLU, padding, bilinear upsampling, mm
or large concatenation, yet the passes for those re-traced it all the same: on SmolLM2-135M they
were nearly half of the delegate preprocessing time (py-spy, see README). ExecuTorch has no option to
choose the passes for a given graph, so ``skip_inapplicable_passes`` skips, for the duration of one
lowering, a pass whose graph holds none of the operators it rewrites. A pass that would match
nothing only re-traces an already traced graph, so leaving it out does not change the program
(tests/test_pte.py compares the outputs).

``decompose_once``: ``to_edge_transform_and_lower`` decomposes the whole program three times for a
partitioner that hands it a ``check_op_support`` function (XNNPACK's does): once to functionalize,
once with the partitioner's ops kept, and once more after tagging the kept nodes that pass the check,
so that the ones that fail it decompose after all. When every kept node passes the check, the third
decomposition changes nothing; ExecuTorch takes its shorter path (functionalize, then decompose
once) for a partitioner with no check function, so ``decompose_once`` runs the check itself, once,
and reports "no check" when nothing fails it. The program is the same (tests/test_pte.py compares the files).
"""

from __future__ import annotations

import contextlib
import functools

import torch

VIEW_OPS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


def static_view_shapes(exported_program) -> int:
    """Rewrite, in place, reshapes whose target shape holds a symbol but whose output has at most one
    symbolic dim, to the static form XNNPACK lowers; returns how many were rewritten."""
    graph = exported_program.graph_module.graph
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function" or _op_name(node.target) not in VIEW_OPS:
            continue
        shape = node.args[1]
        if all(isinstance(d, int) for d in shape) or "val" not in node.meta:
            continue
        out_shape = list(node.meta["val"].shape)
        symbolic = [i for i, d in enumerate(out_shape) if not _is_static(d)]
        if len(symbolic) > 1:
            continue
        node.args = (node.args[0], [-1 if i in symbolic else int(d) for i, d in enumerate(out_shape)])
        changed += 1
    if changed:
        graph.eliminate_dead_code()  # the sym_size nodes that only fed those shapes
        exported_program.graph_module.recompile()
    return changed


def _is_static(dim) -> bool:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return is_concrete_int(dim)


def _op_name(target) -> str:
    # ATen overloads print as "aten.view.default"; edge ops carry that text in __name__ instead.
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


# Pass class name -> operators the pass needs to find before it rewrites anything. A pass is
# skipped only when none of its operators is in the graph it is given; a pass not listed here
# always runs. The two pattern passes match ExecuTorch's own pattern graphs
# (``backends/xnnpack/partition/graphs``): bilinear upsampling is the ``upsample_bilinear2d`` op, and
# the SDPA pattern needs ``_softmax`` and ``bmm`` (a test checks these against the patterns).
# Passes whose operators ExecuTorch keeps in a class attribute are added from it (``pass_operators``).
PASS_OPERATORS = {
    # XNNPACK delegate preprocessing, once per partition.
    "ConvertToUpsampleBilinear2d": {"aten.upsample_bilinear2d.vec"},
    "ConvertToSDPAPass": {"aten._softmax.default"},
    "FuseBatchNormPass": {"aten._native_batch_norm_legit_no_training.default", "aten.native_batch_norm.default"},
    "DecomposeBatchNorm": {"aten._native_batch_norm_legit_no_training.default", "aten.native_batch_norm.default"},
    "Conv1dUnsqueezePass": {"aten.convolution.default"},
    "PReLUReshapePass": {"aten._prelu_kernel.default"},
    "InsertPadQDQPass": {"aten.constant_pad_nd.default"},
    "FuseActivationPass": {"aten.relu.default", "aten.hardtanh.default"},
    "RemoveGetItemPass": {"aten.max_pool2d_with_indices.default", "aten.max.dim"},
    "XNNPACKRemoveCloneOpsTransform": {"aten.clone.default", "dim_order_ops._clone_dim_order.default"},
    "RemoveRedundantCopyPass": {"aten._to_copy.default"},
    # Splits concatenations of more than five tensors.
    "DecomposeConcatenate": {"aten.cat.default"},
    # Edge-program generation, on the whole graph: rewrites aten.t into t_copy.
    "NormalizeTransposePass": {"aten.t.default"},
}


def _has_channels_last(graph_module) -> bool:
    """Whether XNNPACK's channels-last pass has anything to convert: an operator it runs in NHWC, or
    an input already in channels-last layout (the only ways a node becomes NHWC in that pass)."""
    from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import (
        ChannelsLastTaggedReshapePass as ChannelsLast,
    )

    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in ChannelsLast.memory_sensitive_ops_nhwc:
            return True
        val = node.meta.get("val")
        if (not node.all_input_nodes and isinstance(val, torch.Tensor) and val.dim() == 4
                and ChannelsLast._is_nhwc_tensor(val)):
            return True
    return False


# Pass class name -> what a graph must have for the pass to change it, for passes not keyed by operators.
PASS_CONDITIONS = {
    # Copies node.meta["custom"] from a node to the quantize / dequantize nodes after it.
    "PropagateCustomMetaPass": lambda graph_module: any("custom" in n.meta for n in graph_module.graph.nodes),
    # Replaces view operators (by the operator's own is_view flag) with their functional copies.
    "ReplaceBrokenOpsWithFunctionalOpsPass": lambda graph_module: any(
        n.op == "call_function" and getattr(n.target, "is_view", False) for n in graph_module.graph.nodes),
    # Converts layouts around the operators XNNPACK runs channels-last (convolution, pooling, ...).
    "ChannelsLastTaggedReshapePass": _has_channels_last,
}


@functools.cache
def pass_operators() -> dict[str, frozenset[str]]:
    """``PASS_OPERATORS`` plus the passes whose operators come from ExecuTorch's own tables."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.exir.passes.dim_order_ops_registry import DimOrderOpsMap, MemoryFormatOpsMap
    from executorch.exir.passes.legalize_portable_dim_order_pass import LegalizePortableDimOrderPass

    derived = {
        # [add]mm / bmm left from a decomposed linear, turned back into linear.
        "ConvertToLinearPass": ConvertToLinearPass.targets,
        # memory-format ops -> dim-order ops, and back inside XNNPACK partitions.
        "MemoryFormatOpsPass": DimOrderOpsMap,
        "DimOrderOpsRevertPass": MemoryFormatOpsMap,
        # The portable ops that need a contiguous input, after lowering.
        "LegalizePortableDimOrderPass": LegalizePortableDimOrderPass._target_ops,
    }
    table = {name: frozenset(ops) for name, ops in PASS_OPERATORS.items()}
    table.update({name: frozenset(_op_name(op) for op in ops) for name, ops in derived.items()})
    return table


def graph_operators(graph_module) -> set[str]:
    """Names of the operators a graph calls, as ``aten.<op>.<overload>``."""
    return {_op_name(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}


def pass_applies(pass_name: str, graph_module) -> bool:
    """False when the pass named ``pass_name`` has provably nothing to rewrite in ``graph_module``."""
    operators = pass_operators().get(pass_name)
    if operators is not None and not operators & graph_operators(graph_module):
        return False
    condition = PASS_CONDITIONS.get(pass_name)
    return condition is None or condition(graph_module)


@contextlib.contextmanager
def skip_inapplicable_passes():
    """While active, ExecuTorch's passes (edge generation, XNNPACK preprocessing, ``to_executorch``)
    that have nothing to rewrite in the graph they are given return it as it is, without re-tracing.

    Patched at ``PassBase.__call__``, the one call every pass of every ExecuTorch pass manager goes
    through, so that a pass is skipped whichever manager runs it.
    """
    from torch.fx.passes.infra.pass_base import PassBase, PassResult

    original = PassBase.__call__

    def call_if_applicable(self, graph_module):
        if not pass_applies(type(self).__name__, graph_module):
            return PassResult(graph_module, False)
        return original(self, graph_module)

    PassBase.__call__ = call_if_applicable
    try:
        yield
    finally:
        PassBase.__call__ = original


def decompose_once(partitioner):
    """``partitioner``, answering ``ops_to_not_decompose`` with no check function when every node of
    the ops it keeps passes its check (so ExecuTorch decomposes the program once less)."""
    original = partitioner.ops_to_not_decompose

    def ops_to_not_decompose(exported_program):
        ops, check = original(exported_program)
        if check is None:
            return ops, None
        kept = set(ops)
        nodes = [n for n in exported_program.graph.nodes if n.op == "call_function" and n.target in kept]
        return (ops, None) if all(check(n) for n in nodes) else (ops, check)

    partitioner.ops_to_not_decompose = ops_to_not_decompose
    return partitioner
