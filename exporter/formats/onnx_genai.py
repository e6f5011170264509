"""genai_config.json: what onnxruntime-genai needs to generate with an ONNX bundle of a causal LM.

onnxruntime-genai (``onnxruntime_genai.Model(bundle_dir)``) reads the model's shapes, special tokens
and graph tensor names from this file, and the tokenizer from tokenizer.json beside it. Our graph
already uses the tensor names it expects by default; they are written out anyway so the file says
what it relies on. Two settings follow from how we export: ``past_present_share_buffer`` is false
(our graph takes the past and returns past + new as a new tensor, it does not write into a
max-length buffer), and the model type is one genai knows, else the generic decoder-only type.
"""

from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
# Model types onnxruntime-genai 0.18 treats as plain decoder-only LMs with our graph's inputs; any
# other family is written as "llama", the same decoder-only path (the type picks no graph rewrite).
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3")


def genai_config(spec: dict, config, tokenizer, context_length: int) -> dict:
    """The genai_config.json of a causal-LM ONNX build described by ``spec`` (its runtime.json)."""
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    eos = spec["eos_token_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    n_layers = spec["num_layers"]
    names = spec["inputs"] + spec["cache"]["inputs"] + spec["outputs"] + spec["cache"]["outputs"]
    assert names[3] == "past_key_values.0.key" and names[3 + 2 * n_layers + 1] == "present.0.key", names
    model_type = spec["model_type"] if spec["model_type"] in GENAI_TYPES else "llama"
    return {
        "model": {
            "type": model_type,
            "bos_token_id": spec["bos_token_id"] if spec["bos_token_id"] is not None else eos[0],
            "eos_token_id": eos,
            "pad_token_id": int(pad),
            "context_length": int(context_length),
            "vocab_size": spec["vocab_size"],
            "decoder": {
                "filename": spec["artifact"],
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": spec["head_dim"],
                "hidden_size": int(text_cfg.hidden_size),
                "num_attention_heads": int(text_cfg.num_attention_heads),
                "num_key_value_heads": spec["num_kv_heads"],
                "num_hidden_layers": n_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0, "early_stopping": True, "min_length": 0,
            "max_length": int(context_length),
            "past_present_share_buffer": False,  # see the module docstring
        },
    }


def write_genai_config(spec: dict, loaded, context_length: int, out_dir: Path) -> str:
    """Write genai_config.json into ``out_dir``; returns its file name."""
    config = genai_config(spec, loaded.config, loaded.tokenizer, context_length)
    (Path(out_dir) / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
    return GENAI_CONFIG
