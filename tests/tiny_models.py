"""Tiny random-weight models built from the families' tiny configs, saved as real Hugging Face folders.

Each folder has config.json, model.safetensors and a real BPE tokenizer trained (in milliseconds) on
the shipped English text, so tests go through the same loading code as users' models.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 1000


def train_tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries, trained on the shipped text (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from exporter.texts import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = builtin_text("eval_english.txt") + builtin_text("calibration_english.txt")
    tok.train_from_iterator(text.split("\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


CLASSIFIER_SUFFIX = "-classifier"  # e.g. "bert-classifier": the family's ...ForSequenceClassification
CLASSIFIER_LABELS = ("play", "pause", "skip")


def as_gguf_blocks(weight, levels: int = 16, group: int = 32):
    """``weight`` rounded as llama.cpp's Q4_1 (levels 16) / Q5_1 (32) rounds it, then dequantized:
    blocks of ``group`` inputs, ``w = d * q + m`` with d = (max - min) / (levels - 1), m = min."""
    import torch

    blocks = weight.detach().float().unflatten(-1, (-1, group))
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = ((hi - lo) / (levels - 1)).half().float()  # GGUF stores d and m as float16
    lo = lo.half().float()
    q = torch.clamp(torch.round((blocks - lo) / d), 0, levels - 1)
    return (q * d + lo).flatten(-2)


def make_model_dir(arch: str, folder: Path, seed: int = 0, source_levels: dict[str, int] | None = None,
                   layers: int | None = None, edit=None) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer into ``folder``; return it.

    ``arch`` is a family name, or ``<encoder family>-classifier`` for its sequence classifier.
    ``source_levels`` ({role or "*": levels}) rounds the decoder linears onto GGUF-like blocks of 32
    (``as_gguf_blocks``), as a model dequantized from a GGUF arrives; lm_head stays float.
    ``layers`` overrides the tiny config's decoder layer count; ``edit(model)`` changes weights before saving.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    from exporter.families import FAMILIES

    classifier = arch.endswith(CLASSIFIER_SUFFIX)
    family = FAMILIES.get(arch.removesuffix(CLASSIFIER_SUFFIX))  # each family brings its tiny config
    config = family.tiny_config()
    if layers:
        config.num_hidden_layers = layers
    causal = family.kind == "causal-lm"
    if classifier:
        config.num_labels = len(CLASSIFIER_LABELS)
        config.id2label = dict(enumerate(CLASSIFIER_LABELS))
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = AutoModelForSequenceClassification.from_config(config)
        with torch.no_grad():  # clear-cut decisions, as a trained classifier makes (see the lm_head below)
            head = [m for n, m in model.named_modules() if n.endswith("classifier") and hasattr(m, "weight")]
            head[-1].weight.mul_(8.0)
    else:
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    if causal:
        # Random init gives near-uniform logits; scale the output layer so argmax decisions are
        # clear-cut and greedy comparisons are meaningful, as in a trained model.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    if source_levels:
        with torch.no_grad():
            for name, module in model.named_modules():
                role = family.role_of(name)
                levels = source_levels.get(role, source_levels.get("*"))
                if isinstance(module, torch.nn.Linear) and role != "lm_head" and levels:
                    module.weight.copy_(as_gguf_blocks(module.weight, levels))
    if edit:
        with torch.no_grad():
            edit(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder
