"""GPT-2 (and DistilGPT-2): learned positions, LayerNorm, fused c_attn, transformers' Conv1D layers
(loaded as nn.Linear by exporter.loading, which every quantizer then sees)."""

from exporter.families import Family, register


def tiny_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=512, bos_token_id=1,
                      eos_token_id=2)


register(Family(
    name="gpt2", model_types=("gpt2",), kind="causal-lm",
    description="GPT-2 decoder: learned positions, LayerNorm, fused qkv (c_attn), GELU MLP",
    layers=r"transformer\.h\.(\d+)",
    layer_roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj",
                 "attn_norm": "ln_1", "mlp_norm": "ln_2"},
    model_roles={"embed": r"transformer\.wte", "lm_head": r"lm_head", "final_norm": r"transformer\.ln_f"},
    smoothing=(("attn_norm", ("qkv",)), ("mlp_norm", ("up",))),
    special=("Conv1D as Linear", "learned positions", "tied embeddings"),
    tiny_config=tiny_config, examples="GPT-2, DistilGPT-2",
))
