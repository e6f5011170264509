"""Llama-family layers written so that XNNPACK takes a decoder layer whole.

Why: ExecuTorch's lowering time grows with the number of XNNPACK partitions, and every delegate
boundary costs time at run time too. Two pieces of transformers' Llama code split each decoder
layer's partition into several, because XNNPACK cannot take them with a dynamic sequence length:

* RMSNorm, ``x * rsqrt(mean(x**2, -1) + eps) * weight``: XNNPACK lowers ``mean`` only over the two
  innermost dims of a 4-D tensor, and the scalar ``+ eps`` becomes a portable-kernel op (two norms a
  layer, each split in three). Here mean and epsilon are one linear op with a constant ``1/width``
  row as weight and ``eps`` as bias, ``(x * x) @ w.T + eps``, which XNNPACK runs as fully connected.
* ``rotate_half`` of the rotary embedding slices the head dim of a tensor whose sequence dim is
  dynamic, and XNNPACK takes no slice of a dynamic tensor. ``cat(-x2, x1)`` is ``x @ R`` for a
  constant signed permutation ``R`` (exact: one non-zero term per output), again fully connected.

Measured on a 4-layer slice of SmolLM2 int4-weight (with ``pte_passes`` too): 27 delegates -> 12,
lowering 75 s -> 53 s (``benchmarks/pte_lowering.py``). Both rewrites compute the same function (tests
compare them with transformers' code); they apply to the eager recipes (fp32, fp16, int4-weight)
only, since pt2e's XNNPACKQuantizer would quantize the new linear ops too.
"""

from __future__ import annotations

import contextlib
import sys

import torch


def supported(loaded) -> bool:
    """Whether the model's norm and rotary code are the Llama kind these rewrites reproduce.

    The family says so (``Family.pte_linear_layers``, exporter/families/): RMSNorm
    ``weight * (x * rsqrt(mean(x^2) + eps))`` with float32 statistics and a module-level ``rotate_half``
    (Gemma's ``1 + weight`` norm is not).
    """
    return bool(getattr(loaded, "family", None) and loaded.family.pte_linear_layers)


class LinearMeanRMSNorm(torch.nn.Module):
    """The same function as transformers' ``LlamaRMSNorm``, with mean and epsilon as one linear op."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight = norm.weight
        width = norm.weight.shape[-1]
        self.register_buffer("mean_row", torch.full((1, width), 1.0 / width, dtype=torch.float32), persistent=False)
        self.register_buffer("eps", torch.tensor([float(norm.variance_epsilon)], dtype=torch.float32),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        variance_eps = torch.nn.functional.linear(x * x, self.mean_row, self.eps)
        return self.weight * (x * torch.rsqrt(variance_eps)).to(input_dtype)


def use_linear_mean_rmsnorm(model: torch.nn.Module) -> int:
    """Replace every Llama-style RMSNorm of ``model`` in place; returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
               and isinstance(getattr(module, "weight", None), torch.Tensor)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, LinearMeanRMSNorm(module))
    return len(targets)


def rotation_matrix(head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """``R`` with ``x @ R == cat(-x[..., h:], x[..., :h])`` (transformers' ``rotate_half``), ``h = head_dim / 2``."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=dtype)
    r[half:, :half] = -torch.eye(half, dtype=dtype)  # output i < h takes -x[h + i]
    r[:half, half:] = torch.eye(half, dtype=dtype)  # output h + i takes x[i]
    return r


ROTATION_BUFFER = "rotate_half_weight"


@contextlib.contextmanager
def rotate_half_as_linear(model: torch.nn.Module):
    """While active (around ``torch.export``), the model's ``rotate_half`` is a linear op.

    transformers' ``apply_rotary_pos_emb`` looks ``rotate_half`` up in its own module at call time,
    so swapping that module attribute changes the traced graph and nothing else. The weight is a
    buffer of ``model`` (a tensor the function only closed over would not be one of the program's).
    """
    module = sys.modules[type(model).__module__]
    original = getattr(module, "rotate_half", None)
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if original is None or head_dim % 2:
        yield
        return
    dtype = next(model.parameters()).dtype
    # linear takes W with x @ W.T
    model.register_buffer(ROTATION_BUFFER, rotation_matrix(head_dim, dtype).T.contiguous(), persistent=False)

    def rotate_half(x):
        return torch.nn.functional.linear(x, getattr(model, ROTATION_BUFFER))

    module.rotate_half = rotate_half
    try:
        yield
    finally:
        module.rotate_half = original
