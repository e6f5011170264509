"""GPT-NeoX / Pythia: parallel attention and MLP, partial rotary, fused query_key_value."""

from exporter.families import Family, register


def tiny_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


register(Family(
    name="gpt_neox", model_types=("gpt_neox",), kind="causal-lm",
    description="GPT-NeoX decoder: parallel attention + MLP, partial rotary, fused qkv",
    layers=r"gpt_neox\.layers\.(\d+)",
    layer_roles={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                 "down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    model_roles={"embed": r"gpt_neox\.embed_in", "lm_head": r"lm_head|embed_out", "final_norm": r"gpt_neox\.final_layer_norm"},
    smoothing=(("attn_norm", ("qkv",)), ("mlp_norm", ("up",))),
    special=("parallel residual", "partial rotary"),
    tiny_config=tiny_config, examples="Pythia-70M/160M/410M",
))
