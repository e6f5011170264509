"""Qwen2 / Qwen2.5: a Llama layout with biases on q/k/v."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYER_ROLES, LLAMA_LAYERS, LLAMA_MODEL_ROLES, LLAMA_SMOOTHING


def tiny_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2)


register(Family(
    name="qwen2", model_types=("qwen2",), kind="causal-lm",
    description="Qwen2/2.5 decoder: the Llama layout with q/k/v biases",
    layers=LLAMA_LAYERS, layer_roles=LLAMA_LAYER_ROLES, model_roles=LLAMA_MODEL_ROLES, smoothing=LLAMA_SMOOTHING,
    pte_custom_sdpa=True, pte_linear_layers=True, special=("q/k/v biases", "untied embeddings (0.5B and up)"),
    tiny_config=tiny_config, examples="Qwen2.5-0.5B/1.5B(-Instruct, -Coder)",
))
