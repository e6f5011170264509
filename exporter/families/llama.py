"""Llama: SmolLM2, Llama-3.2, TinyLlama. The reference decoder the other families are compared with."""

from exporter.families import Family, register

# The layer layout Llama, Mistral, Qwen2/3 and SmolLM3 share (transformers' modeling_llama and its copies).
LLAMA_LAYER_ROLES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
LLAMA_MODEL_ROLES = {"embed": r"model\.embed_tokens", "lm_head": r"lm_head", "final_norm": r"model\.norm"}
LLAMA_LAYERS = r"model\.layers\.(\d+)"
# SmoothQuant pairs: input norm -> q/k/v, post-attention norm -> gate/up, and up -> down (down sees
# act(gate) * up, so scaling up's output channel scales down's input channel).
LLAMA_SMOOTHING = (("attn_norm", ("q", "k", "v")), ("mlp_norm", ("gate", "up")), ("up", ("down",)))


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=True)


register(Family(
    name="llama", model_types=("llama",), kind="causal-lm",
    description="Llama decoder: RMSNorm, rotary, grouped-query attention, SwiGLU MLP",
    layers=LLAMA_LAYERS, layer_roles=LLAMA_LAYER_ROLES, model_roles=LLAMA_MODEL_ROLES, smoothing=LLAMA_SMOOTHING,
    pte_custom_sdpa=True, pte_linear_layers=True, special=("tied embeddings (SmolLM2)",),
    tiny_config=tiny_config, examples="SmolLM2-135M/360M/1.7B, Llama-3.2-1B/3B, TinyLlama-1.1B",
))
