"""Tiny random-weight models built from transformers configs, saved as real Hugging Face folders.

Each folder has config.json, model.safetensors and a real BPE tokenizer trained (in milliseconds) on
the shipped English text, so tests go through the same loading code as users' models.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 1000

CONFIGS = {
    "llama": lambda: __import__("transformers").LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    ),
    "gpt2": lambda: __import__("transformers").GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": lambda: __import__("transformers").Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    ),
    "mistral": lambda: __import__("transformers").MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        sliding_window=None,
    ),
    # Gemma-3 (270M: 1 kv head, head_dim 256, 5 sliding layers per global one). A window of 8 makes
    # tests cross it within a few tokens; head_dim 256 with one kv head is what broke TFLite.
    "gemma3": lambda: __import__("transformers").Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=8, vocab_size=VOCAB, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    ),
    "bert": lambda: __import__("transformers").BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=512,
    ),
}


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


def make_model_dir(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer into ``folder``; return it."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(config)
    if arch != "bert":
        # Random init gives near-uniform logits; scale the output layer so argmax decisions are
        # clear-cut and greedy comparisons are meaningful, as in a trained model.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder
