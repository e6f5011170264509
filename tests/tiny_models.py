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


def make_model_dir(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer into ``folder``; return it.

    ``arch`` is a family name, or ``<encoder family>-classifier`` for its sequence classifier.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    from exporter.families import FAMILIES

    classifier = arch.endswith(CLASSIFIER_SUFFIX)
    family = FAMILIES.get(arch.removesuffix(CLASSIFIER_SUFFIX))  # each family brings its tiny config
    config = family.tiny_config()
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
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder
