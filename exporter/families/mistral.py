"""Mistral: a Llama layout with an optional sliding attention window."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYER_ROLES, LLAMA_LAYERS, LLAMA_MODEL_ROLES, LLAMA_SMOOTHING


def tiny_config():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, sliding_window=None)


register(Family(
    name="mistral", model_types=("mistral",), kind="causal-lm",
    description="Mistral decoder: the Llama layout, optional sliding window",
    layers=LLAMA_LAYERS, layer_roles=LLAMA_LAYER_ROLES, model_roles=LLAMA_MODEL_ROLES, smoothing=LLAMA_SMOOTHING,
    # custom_sdpa ignores a window: exporter/formats/pte_attention.py checks the window against the context.
    pte_custom_sdpa=True, pte_linear_layers=True, special=("sliding window (when set)",),
    tiny_config=tiny_config, examples="Mistral-7B, Ministral",
))
