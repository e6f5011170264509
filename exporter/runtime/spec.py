"""The tensor contract of ``runtime.json``: the names of a graph's inputs, outputs and KV-cache tensors.

Each format writes these fields with ``contract_fields`` (this file is the one place the names are
spelt) and every reader takes them from the bundle: the runners, the quantizers' calibration feeds and
Jetson's TensorRT shape profiles. An ONNX causal LM's runtime.json holds::

    "contract": 1,
    "inputs": ["input_ids", "attention_mask", "position_ids"],
    "outputs": ["logits"],
    "cache": {"inputs": ["past_key_values.0.key", "past_key_values.0.value", ...],
              "outputs": ["present.0.key", "present.0.value", ...],
              "layout": ["batch", "kv_heads", "seq", "head_dim"], "max_context": null}

``inputs`` and ``outputs`` leave the cache out and are in call order; the position of a name gives its
role (``ROLES``: tokens, mask, positions; logits or hidden). Cache lists go layer by layer, key then
value; they are empty where the program keeps its cache in its own buffers (pte), and ``cache`` is
null for encoders. A static cache has ``max_context`` slots; null means it grows with the sequence.
TFLite adds ``signatures`` ({name: tokens per call}; the one of length 1 decodes) and pte ``method``.

This module is part of the device-side runtime, so it imports nothing; the exporter imports it too.
"""

from __future__ import annotations

import re

CONTRACT_VERSION = 1
CLASSIFIER = "sequence-classifier"
ENCODER_KINDS = ("encoder", CLASSIFIER)  # kinds without a cache: one call maps tokens to the output
# The output role of each encoder kind: hidden states (len, hidden), or a classifier's label logits.
ENCODER_OUTPUT = {"encoder": "hidden", CLASSIFIER: "logits"}
CACHE_LAYOUT = ["batch", "kv_heads", "seq", "head_dim"]
PTE_METHOD = "forward"

# (role, name) of each input and output besides the cache, per (format, kind), in call order. The names
# are those of optimum / transformers.js (onnx), LiteRT's generative examples (tflite) and ExecuTorch's
# Llama export (pte), so other runners read the same graphs.
_IO = {
    ("onnx", "causal-lm"): ((("tokens", "input_ids"), ("mask", "attention_mask"), ("positions", "position_ids")),
                            (("logits", "logits"),)),
    ("onnx", "encoder"): ((("tokens", "input_ids"), ("mask", "attention_mask")), (("hidden", "last_hidden_state"),)),
    ("tflite", "causal-lm"): ((("tokens", "tokens"), ("positions", "input_pos")), (("logits", "logits"),)),
    ("tflite", "encoder"): ((("tokens", "input_ids"), ("mask", "attention_mask")), (("hidden", "last_hidden_state"),)),
    ("pte", "causal-lm"): ((("tokens", "tokens"), ("positions", "input_pos")), (("logits", "logits"),)),
    ("pte", "encoder"): ((("tokens", "input_ids"),), (("hidden", "last_hidden_state"),)),
}
_IO.update({(fmt, CLASSIFIER): (ins, (("logits", "logits"),)) for (fmt, kind), (ins, _) in list(_IO.items())
            if kind == "encoder"})
ROLES = {key: ([r for r, _ in ins], [r for r, _ in outs]) for key, (ins, outs) in _IO.items()}

# Bounds for untrusted bundles: a real contract names a few hundred tensors of a few dozen characters.
MAX_NAMES = 4096
MAX_SIGNATURES = 64
MAX_TOKENS_PER_CALL = 1 << 20
# Plain names only: no separators that TensorRT's ``name:dims,...`` shape strings or paths would split.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")


def cache_names(fmt: str, num_layers: int, legacy: bool = False) -> tuple[list[str], list[str]]:
    """(cache inputs, cache outputs) of a causal LM graph of ``num_layers`` layers in format ``fmt``.

    TFLite's are LiteRT-LM's names (``kv_cache_k_<i>`` / ``kv_cache_v_<i>``: its executor finds the cache
    by that prefix), so the same flatbuffer runs in our runner and in LiteRT-LM; ``legacy``: the
    ``k_<i>`` / ``v_<i>`` of bundles written before the contract (read with the names they were built with).
    """
    layers = range(int(num_layers))
    if fmt == "onnx":
        return ([f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")],
                [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")])
    if fmt == "tflite":  # each signature returns the updated cache under its input's name
        names = [f"{'' if legacy else 'kv_cache_'}{kv}_{i}" for i in layers for kv in "kv"]
        return names, list(names)
    return [], []  # pte: the program's mutable buffers hold the cache


def signature_names(kind: str, lengths: list[int]) -> dict[str, int]:
    """TFLite signature names: ``prefill_<N>`` and a one-token ``decode`` (causal LMs), or ``encode_<N>``."""
    if kind in ENCODER_KINDS:
        return {f"encode_{n}": int(n) for n in lengths}
    return {**{f"prefill_{n}": int(n) for n in lengths}, "decode": 1}


def contract_fields(fmt: str, kind: str, num_layers: int = 0, max_context: int | None = None,
                    lengths: list[int] | None = None, legacy: bool = False) -> dict:
    """The contract fields a format writes into runtime.json (``lengths``: tflite's signature lengths;
    ``legacy``: the cache names of bundles from before the contract)."""
    ins, outs = _IO[(fmt, kind)]
    fields = {"contract": CONTRACT_VERSION, "inputs": [n for _, n in ins], "outputs": [n for _, n in outs],
              "cache": None}
    if kind == "causal-lm":
        cache_in, cache_out = cache_names(fmt, num_layers, legacy)
        fields["cache"] = {"inputs": cache_in, "outputs": cache_out, "layout": list(CACHE_LAYOUT),
                           "max_context": max_context}
    if fmt == "tflite":
        fields["signatures"] = signature_names(kind, lengths or [])
    if fmt == "pte":
        fields["method"] = PTE_METHOD
    return fields


def contract(spec: dict) -> dict:
    """The contract fields of ``spec``; bundles written before the contract get the names they were
    exported with (the same builders, from their layer count and signatures)."""
    if "contract" in spec:
        return spec
    fmt, kind = spec.get("format"), spec.get("kind", "causal-lm")
    if (fmt, kind) not in _IO:
        return spec
    layers = spec.get("num_layers")
    fields = contract_fields(fmt, kind, layers if _is_count(layers) else 0, spec.get("max_context"), legacy=True)
    if fmt == "tflite":  # the signatures were written already; older encoders had one, "signature"
        fields["signatures"] = spec.get("signatures") or {spec.get("signature", "encode"): spec.get("max_context") or 1}
    return {**spec, **fields}


def roles(spec: dict) -> dict[str, str]:
    """Role -> tensor name of the spec's inputs and outputs, e.g. ``{"tokens": "input_ids", ...}``."""
    c = contract(spec)
    in_roles, out_roles = ROLES.get((spec.get("format"), spec.get("kind", "causal-lm")), ([], []))
    return {**dict(zip(in_roles, c["inputs"])), **dict(zip(out_roles, c["outputs"]))}


def decode_signature(signatures: dict[str, int]) -> str | None:
    """The tflite signature that takes one token (None for encoders)."""
    return next((name for name, n in signatures.items() if n == 1), None)


def contract_problem(spec: dict) -> str | None:
    """What is wrong with the contract fields of an untrusted runtime.json, or None (also for a
    format this runtime does not know: its runner is refused elsewhere)."""
    spec = contract(spec)  # an older bundle is checked with the names it was exported with
    if "contract" not in spec:
        return None
    version = spec["contract"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CONTRACT_VERSION:
        return f"contract version {version!r} is not one this runtime reads (1..{CONTRACT_VERSION})"
    key = (spec.get("format"), spec.get("kind", "causal-lm"))
    want_in, want_out = ROLES.get(key, (None, None))
    problem = (_names_problem(spec.get("inputs"), "inputs", want_in)
               or _names_problem(spec.get("outputs"), "outputs", want_out)
               or _cache_problem(spec.get("cache"), spec))
    if problem is None and "signatures" in spec:
        problem = _signatures_problem(spec["signatures"])
    if problem is None and "method" in spec and not _is_name(spec["method"]):
        problem = f"method {str(spec['method'])[:80]!r} is not a plain name"
    return problem


def _is_count(value, most: int = MAX_TOKENS_PER_CALL) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most


def _is_name(value) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _names_problem(names, what: str, want: list[str] | None) -> str | None:
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        return f"{what} must be a list of at most {MAX_NAMES} tensor names"
    bad = next((n for n in names if not _is_name(n)), None)
    if bad is not None:
        return f"{what} holds {str(bad)[:80]!r}, which is not a plain tensor name"
    if want is not None and len(names) != len(want):
        return f"{what} names {len(names)} tensors; this format's graph has {len(want)} ({', '.join(want)})"
    return None


def _cache_problem(cache, spec: dict) -> str | None:
    if spec.get("kind", "causal-lm") != "causal-lm":
        return None if cache is None else "an encoder has no cache"
    if not isinstance(cache, dict):
        return "a causal LM needs a cache object (inputs, outputs, layout, max_context)"
    problem = _names_problem(cache.get("inputs"), "cache inputs", None) or _names_problem(
        cache.get("outputs"), "cache outputs", None)
    if problem:
        return problem
    if cache.get("layout") != CACHE_LAYOUT:
        return f"cache layout must be {CACHE_LAYOUT}"
    slots = cache.get("max_context")
    if slots is not None and not _is_count(slots):
        return f"cache max_context must be null or a count of slots up to {MAX_TOKENS_PER_CALL}"
    layers = spec.get("num_layers")
    for what in ("inputs", "outputs"):
        names = cache[what]
        if names and isinstance(layers, int) and len(names) != 2 * layers:
            return f"cache {what} name {len(names)} tensors for {layers} layers (a key and a value each)"
    return None


def _signatures_problem(signatures) -> str | None:
    if not isinstance(signatures, dict) or not 0 < len(signatures) <= MAX_SIGNATURES:
        return f"signatures must map up to {MAX_SIGNATURES} names to token counts"
    for name, n in signatures.items():
        if not _is_name(name):
            return f"signature {str(name)[:80]!r} is not a plain name"
        if not _is_count(n):
            return f"signature {name} takes {str(n)[:40]!r} tokens, not a count up to {MAX_TOKENS_PER_CALL}"
    return None
