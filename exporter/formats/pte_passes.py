"""Faster XNNPACK lowering: graph rewrites of our own around ExecuTorch's lowering.

``static_view_shapes``: XNNPACK takes a reshape only when its target shape is made of integers, with
at most one ``-1``; transformers writes ``view(batch, seq, -1, head_dim)`` with the traced ``seq``
(a symbol), so with a dynamic sequence length every head split and merge of every attention layer
fell out of the delegate and split its partition. The same view with its one symbolic dim written
as ``-1`` and the ``-1`` as the number it stands for is the same reshape, and XNNPACK takes it.

``skip_inapplicable_xnnpack_passes``: ExecuTorch's ``XnnpackBackend.preprocess`` runs the same 17
passes on every partition it lowers, and each pass ends by re-tracing its partition with fake tensors, even when it
changed nothing. A language model has no batch norm, convolution, PReLU, padding or bilinear
upsampling, yet the passes for those still re-trace each of its ~200 partitions: on SmolLM2-135M
they were nearly half of the delegate preprocessing time (py-spy, see README). ExecuTorch has no option
to choose the passes for a given graph, so ``skip_inapplicable_xnnpack_passes`` swaps in, for the
duration of one lowering, a pass manager that leaves out a pass when its partition holds none of
the operators the pass rewrites. A pass that would match nothing only re-traces an already traced
graph, so leaving it out does not change the program (tests/test_pte.py compares the outputs).
"""

from __future__ import annotations

import contextlib

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


# Pass class name -> edge operators the pass needs to find before it
# rewrites anything. A pass is skipped only when none of its operators is in the partition; a pass
# not listed here always runs. The two pattern passes match ExecuTorch's own pattern graphs
# (``backends/xnnpack/partition/graphs``): bilinear upsampling is the ``upsample_bilinear2d`` op, and
# the SDPA pattern needs ``_softmax`` and ``bmm`` (a test checks these against the patterns).
PASS_OPERATORS = {
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
    # The dim-order ops it reverts (exir.passes.dim_order_ops_registry.MemoryFormatOpsMap).
    "DimOrderOpsRevertPass": {"dim_order_ops._to_dim_order_copy.default", "dim_order_ops._clone_dim_order.default",
                              "dim_order_ops._empty_dim_order.default"},
    "RemoveRedundantCopyPass": {"aten._to_copy.default"},
}


def graph_operators(graph_module) -> set[str]:
    """Names of the operators a graph calls, as ``aten.<op>.<overload>``."""
    return {_op_name(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}


def applicable_passes(passes: list, graph_module) -> list:
    """``passes`` without those whose operators (``PASS_OPERATORS``) the graph does not call."""
    present = graph_operators(graph_module)
    return [p for p in passes if p.__name__ not in PASS_OPERATORS or PASS_OPERATORS[p.__name__] & present]


@contextlib.contextmanager
def skip_inapplicable_xnnpack_passes():
    """While active, XNNPACK's delegate preprocessing runs only the passes that apply to each partition."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    class ApplicablePassManager(XNNPACKPassManager):
        def transform(self):
            self.passes = applicable_passes(self.passes, self.exported_program.graph_module)
            return super().transform()

    original = xnnpack_preprocess.XNNPACKPassManager
    xnnpack_preprocess.XNNPACKPassManager = ApplicablePassManager
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = original
