"""Gemma 3 (text): scaled embeddings, (1 + weight) RMSNorms around attention and MLP, q/k norms,
interleaved sliding-window and global layers, GELU-tanh gated MLP."""

from exporter.families import Family, register
from exporter.families.llama import LLAMA_LAYER_ROLES, LLAMA_LAYERS, LLAMA_MODEL_ROLES


# As Gemma-3-270M: one kv head and head_dim 256 (what litert-torch once miscompiled); a window of 8 makes
# tests cross it within a few tokens.
def tiny_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, vocab_size=1000, max_position_embeddings=512,
                            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


register(Family(
    name="gemma3", model_types=("gemma3_text", "gemma3"), kind="causal-lm",
    description="Gemma 3 text decoder: sliding-window and global layers, (1+w) RMSNorm, scaled embeddings",
    layers=LLAMA_LAYERS,
    layer_roles={**LLAMA_LAYER_ROLES, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"},
    model_roles=LLAMA_MODEL_ROLES,
    # The norms feeding the MLP are pre_feedforward_layernorm ((1 + w) RMSNorm): not smoothed.
    smoothing=(("up", ("down",)),),
    special=("embedding scale sqrt(hidden)", "(1 + weight) RMSNorm", "q/k norms", "sliding window layers",
             "tied embeddings", "262k vocabulary"),
    tiny_config=tiny_config, examples="Gemma-3-270M, Gemma-3-1B",
))
