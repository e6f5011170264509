"""Phi-3 / Phi-4-mini: fused qkv and gate_up projections."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYERS, LLAMA_MODEL_ROLES


def tiny_config():
    from transformers import Phi3Config

    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


register(Family(
    name="phi3", model_types=("phi3",), kind="causal-lm",
    description="Phi-3 decoder: fused qkv_proj and gate_up_proj, RMSNorm, rotary",
    layers=LLAMA_LAYERS,
    layer_roles={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                 "down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    model_roles=LLAMA_MODEL_ROLES, smoothing=(("attn_norm", ("qkv",)), ("mlp_norm", ("gate_up",))),
    special=("fused qkv / gate_up projections",),
    tiny_config=tiny_config, examples="Phi-3-mini, Phi-3.5-mini, Phi-4-mini",
))
