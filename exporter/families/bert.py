"""BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA; all-MiniLM-L6-v2 is a BERT)."""

from exporter.families import Family, register


def tiny_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=1000, max_position_embeddings=512)


register(Family(
    name="bert", model_types=("bert", "roberta", "xlm-roberta", "electra"), kind="encoder",
    description="BERT-style encoder: post-LayerNorm, absolute positions, GELU MLP",
    # AutoModel gives "encoder.layer.N"; a task model prefixes it ("bert.encoder.layer.N").
    layers=r"encoder\.layer\.(\d+)",
    layer_roles={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense",
                 "attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
    model_roles={"embed": r"embeddings\.word_embeddings",
                 "head": r"(?:pooler\.dense|classifier|classifier\.dense|classifier\.out_proj)"},
    tiny_config=tiny_config, examples="all-MiniLM-L6-v2, BERT-base, RoBERTa, XLM-R, ELECTRA",
))
