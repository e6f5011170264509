"""MobileBERT: a bottlenecked BERT built for phones (stacked FFNs, NoNorm layers)."""

from exporter.families import Family, register


def tiny_config():
    from transformers import MobileBertConfig

    return MobileBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                            max_position_embeddings=512)


register(Family(
    name="mobilebert", model_types=("mobilebert",), kind="encoder",
    description="MobileBERT encoder: bottleneck layers, stacked feed-forward blocks, NoNorm",
    layers=r"encoder\.layer\.(\d+)",
    layer_roles={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
    model_roles={"embed": r"embeddings\.word_embeddings", "head": r"(?:pooler\.dense|classifier)"},
    special=("bottlenecks", "stacked FFNs", "NoNorm"),
    refused={"pte": "torch.export specialises MobileBERT's sequence length (a guard seq != 2), so no "
                    "dynamic-length program can be exported; use --format onnx or tflite"},
    tiny_config=tiny_config, examples="MobileBERT",
))
