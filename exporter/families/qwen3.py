"""Qwen3: a Llama layout with RMSNorm on each head's queries and keys."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYER_ROLES, LLAMA_LAYERS, LLAMA_MODEL_ROLES, LLAMA_SMOOTHING


def tiny_config():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


register(Family(
    name="qwen3", model_types=("qwen3",), kind="causal-lm",
    description="Qwen3 decoder: the Llama layout with per-head q/k RMSNorm",
    layers=LLAMA_LAYERS,
    layer_roles={**LLAMA_LAYER_ROLES, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"},
    model_roles=LLAMA_MODEL_ROLES, smoothing=LLAMA_SMOOTHING,
    pte_custom_sdpa=True, pte_linear_layers=True, special=("q/k norms",),
    tiny_config=tiny_config, examples="Qwen3-0.6B/1.7B",
))
