"""SmolLM3: a Llama layout where some layers skip rotary embeddings (NoPE)."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYER_ROLES, LLAMA_LAYERS, LLAMA_MODEL_ROLES, LLAMA_SMOOTHING


def tiny_config():
    from transformers import SmolLM3Config

    return SmolLM3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


register(Family(
    name="smollm3", model_types=("smollm3",), kind="causal-lm",
    description="SmolLM3 decoder: the Llama layout, rotary off in every 4th layer (NoPE)",
    layers=LLAMA_LAYERS, layer_roles=LLAMA_LAYER_ROLES, model_roles=LLAMA_MODEL_ROLES, smoothing=LLAMA_SMOOTHING,
    pte_custom_sdpa=True, pte_linear_layers=True, special=("no rotary in some layers",),
    tiny_config=tiny_config, examples="SmolLM3-3B",
))
