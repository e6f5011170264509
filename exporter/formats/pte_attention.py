"""ExecuTorch's own attention kernel (``llama::custom_sdpa``) for transformers models exported to ``.pte``.

Why: transformers' static-cache attention attends over all ``max_context`` cache positions on every
step and builds its causal mask from a dozen small ops XNNPACK cannot take. Each of those ops splits
the XNNPACK partition, and lowering time grows with the number of partitions. ExecuTorch's custom
SDPA op reads only the filled part of the cache (``start_pos + seq``) and masks causally inside the
kernel. Measured on SmolLM2-135M layers (2 cores): 4 layers lowered in 64 s instead of 139 s
(27 delegates instead of 83), and decoding was several times faster.

This is the transformation ExecuTorch's LLM export (``--use_sdpa_with_kv_cache``) and
optimum-executorch (``attn_implementation="custom_sdpa"``) apply; here it goes through transformers'
public ``AttentionInterface`` / ``AttentionMaskInterface`` registries, so the model code is untouched.
The op's kernel is part of ExecuTorch's LLM runner and Android demo app; the Python runtime loads it
from ``executorch.extension.llm.custom_ops`` (``exporter/runtime/pte_runner.py`` does, when the bundle
says so).
"""

from __future__ import annotations

ATTENTION_NAME = "executorch_custom_sdpa"
CUSTOM_OPS = "executorch.extension.llm.custom_ops.custom_ops"
def supported(loaded, max_context: int) -> bool:
    """Whether the model's attention is exactly what ``llama::custom_sdpa`` computes at ``max_context``.

    The family says whether its attention is plain causal softmax(QK^T * scale) V over the cache
    (``Family.pte_custom_sdpa``); a sliding window shorter than the context or logit soft-capping in
    this particular config rules it out too (the kernel would ignore them).
    """
    if not (loaded.family and loaded.family.pte_custom_sdpa):
        return False
    cfg = loaded.config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < max_context:
        return False  # a window shorter than the context would be ignored by the causal kernel
    return not getattr(cfg, "attn_logit_softcapping", None)


def use_custom_sdpa(model) -> None:
    """Switch ``model`` (a transformers causal LM) to ExecuTorch's custom SDPA kernel, in place."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _load_custom_ops()
    AttentionInterface.register(ATTENTION_NAME, _custom_sdpa_attention)
    # The kernel masks causally itself: transformers' mask would only add unused graph nodes.
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def _load_custom_ops() -> None:
    import importlib

    importlib.import_module(CUSTOM_OPS)  # registers torch.ops.llama.* (and their ExecuTorch kernels)


def _no_mask(*args, **kwargs):
    return None


def _custom_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function calling ``llama::custom_sdpa``.

    transformers hands over ``[batch, heads, seq, head_dim]`` tensors with the whole static cache as
    key/value; the op takes ``[batch, seq, heads, head_dim]`` and the position of the first query
    token, and reads the cache only up to ``start_pos + seq``. Grouped-query attention is handled
    by the kernel (key/value keep their own head count).
    """
    import torch

    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs["cache_position"].unsqueeze(0)
    start_pos = positions[0][0].item()
    torch._check(start_pos >= 0)
    out = torch.ops.llama.custom_sdpa(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        start_pos, None, 0.0, True, scaling,
    )
    return out.to(query.dtype), None
