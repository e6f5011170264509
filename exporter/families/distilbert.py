"""DistilBERT: a 6-layer distilled BERT with its own module names."""

from exporter.families import Family, register


def tiny_config():
    from transformers import DistilBertConfig

    return DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=1000,
                            max_position_embeddings=512)


register(Family(
    name="distilbert", model_types=("distilbert",), kind="encoder",
    description="DistilBERT encoder",
    layers=r"transformer\.layer\.(\d+)",
    layer_roles={"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                 "up": "ffn.lin1", "down": "ffn.lin2", "attn_norm": "sa_layer_norm", "mlp_norm": "output_layer_norm"},
    model_roles={"embed": r"embeddings\.word_embeddings", "head": r"(?:pre_classifier|classifier)"},
    tiny_config=tiny_config, examples="DistilBERT-base",
))
