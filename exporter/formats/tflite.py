"""TFLite / LiteRT: a multi-signature .tflite converted with litert-torch, run by ai-edge-litert.

litert-torch cannot convert a dynamic sequence length, so a causal LM is exported the way LiteRT's
own generative examples do it: fixed-shape signatures sharing one set of weights,

  ``prefill_<N>`` for each N in ``ExportOptions.prefill_lengths``: ``tokens`` (1, N) int32 (a prompt
  padded to N), ``input_pos`` (N,) int32 (its positions, consecutive), the KV cache ``kv_cache_k_<i>``/``kv_cache_v_<i>``
  (1, kv_heads, max_context, head_dim) per layer; outputs ``logits`` (1, N, vocab) and the updated cache;
  ``decode``: the same with one token.

The cache is a static buffer of ``max_context`` slots written at ``input_pos`` with a dynamic-update-
slice; the attention mask is built inside the graph from ``input_pos`` (slot j is visible to a query
at position p iff j <= p, and on sliding-window layers also j > p - window), so padded prompt tokens
are never seen by real ones and their slots are overwritten by the next real tokens. Encoders get ``encode_<N>`` signatures of a few fixed lengths, padded
with an attention mask. Quantization (``tflite_quant``) runs on the converted flatbuffer. Signature and
tensor names are spelt in ``exporter/runtime/spec.py``; the wrappers take them from the build's spec.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from exporter.errors import ExportFailedError, SlmExportError, condense
from exporter.formats import Artifact, ExportOptions, Format, causal_lm_spec, encoder_output, encoder_spec, register
from exporter.quiet import quiet
from exporter.progress import task
from exporter.runtime.spec import ENCODER_OUTPUT, contract_fields, roles

MODEL_FILE = "model.tflite"
# litert-torch's own switch for its rich progress log (the CLI reports stages through options.progress).
_QUIET_CONVERTER = {"LITERT_TORCH_SHOW_PROGRESS": "n"}


# ---------------------------------------------------------------- torch wrappers


def _explicit_cache_classes():
    """The cache layer and the wrapper module (built lazily so importing this file needs no torch).

    Why a wrapper instead of transformers' StaticCache / TorchExportableModuleWithStaticCache: those
    keep the cache as module buffers mutated in place (``index_copy_``), which a converted .tflite
    cannot hold across signature calls; LiteRT wants the cache as plain inputs and outputs. So each
    call builds a transformers ``Cache`` whose layers wrap the cache tensors it was given and update
    them out of place with ``tfl.dynamic_update_slice`` (litert-torch's own KV-cache op), and the
    wrapper returns the updated tensors as outputs.
    """
    import torch
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice
    from transformers.cache_utils import Cache, CacheLayerMixin

    class ExplicitCacheLayer(CacheLayerMixin):
        """One layer's (keys, values) static buffers, written at ``start`` out of place."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys, values, start):
            super().__init__()
            self.keys, self.values, self.start = keys, values, start
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # buffers are given
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            zero = torch.zeros_like(self.start)
            # (batch, kv_heads, slot, head_dim): the new tokens go to slots start..start+n-1.
            index = [zero, zero, self.start, zero]
            self.keys = dynamic_update_slice(self.keys, key_states.to(self.keys.dtype), index)
            self.values = dynamic_update_slice(self.values, value_states.to(self.values.dtype), index)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self) -> int:
            return 0  # positions are always given explicitly (position_ids)

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    class CausalLMWithExplicitCache(torch.nn.Module):
        """``forward(tokens, input_pos, kv_cache_k_0, kv_cache_v_0, ...) -> {logits, kv_cache_k_0, ...}`` over an HF
        causal LM.

        The keyword names become the signatures' tensor names, so they are the spec's (its contract):
        ``names`` maps the roles tokens / positions / logits to them, ``cache`` lists the cache tensors
        layer by layer, key then value (each returned under its input's name).
        """

        def __init__(self, model, names: dict, cache: list[str]):
            super().__init__()
            self.model = model
            self.names, self.cache = names, cache

        def forward(self, **inputs):
            tokens, input_pos = inputs[self.names["tokens"]], inputs[self.names["positions"]]
            slots = inputs[self.cache[0]].shape[2]
            pairs = list(zip(self.cache[0::2], self.cache[1::2]))
            layers = [ExplicitCacheLayer(inputs[k], inputs[v], input_pos[0]) for k, v in pairs]
            mask = static_cache_masks(self.model.config, input_pos, slots)
            out = self.model(input_ids=tokens, position_ids=input_pos[None], attention_mask=mask,
                             past_key_values=Cache(layers=layers), use_cache=True)
            result = {self.names["logits"]: out.logits}
            for (k, v), layer in zip(pairs, layers):
                result[k] = layer.keys
                result[v] = layer.values
            return result

    return CausalLMWithExplicitCache


def sliding_window_plan(config) -> tuple[int | None, bool]:
    """(window, per layer type) of a causal LM's attention, as transformers' model code decides it.

    Models with ``layer_types`` (Gemma-2/3, Qwen2/3) take a dict of masks keyed by layer type and
    give each layer the mask of its type; models with one ``sliding_window`` and no layer types
    (Mistral, Phi-3) apply the window to every layer's single mask.
    """
    cfg = config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return (int(window), True) if window and "sliding_attention" in layer_types else (None, False)
    if window and getattr(cfg, "use_sliding_window", True):
        return int(window), False
    return None, False


def static_cache_masks(config, input_pos, slots: int):
    """The attention mask(s) over ``slots`` static cache slots for queries at ``input_pos``.

    Slot j holds position j. A query at position p sees slot j iff j <= p (slots after p are padding
    or stale tokens), and on a sliding-window layer also j > p - window (transformers'
    ``sliding_window_overlay``); without the second rule a static cache of more than ``window``
    slots lets sliding layers see tokens the model never attends to. Boolean 4-D masks are passed
    through by transformers as they are: no finfo.min additive constant enters the graph, which
    keeps activation ranges sane for static quantization.
    """
    import torch

    slot = torch.arange(slots, dtype=input_pos.dtype)[None, :]
    visible = slot <= input_pos[:, None]
    window, per_layer_type = sliding_window_plan(config)
    if window is None:
        return visible[None, None]
    windowed = visible & (slot > input_pos[:, None] - window)
    if not per_layer_type:
        return windowed[None, None]
    return {"full_attention": visible[None, None], "sliding_attention": windowed[None, None]}


FOLDED_ATTENTION = "litert_folded_gqa_sdpa"


@contextlib.contextmanager
def folded_gqa_attention(model):
    """While active (around the conversion), grouped-query attention runs without ``repeat_kv``.

    Why: transformers' SDPA path repeats the key/value heads (``expand`` + ``reshape``) before the
    attention matmuls. With ONE kv head (Gemma-3-270M, multi-query attention) the converted
    ``q @ k^T`` is wrong: litert-torch folds the size-1 broadcast into the batched matmul and the
    .tflite gives wrong scores for every query but position 0 (measured: max error 79 on a lone
    ``q @ repeat_kv(k).T``, exact with 2 kv heads or with ``torch.cat`` repeats). Folding each kv
    head's query heads into the query axis instead, ``(b, kv, groups * seq, d)`` against the
    un-repeated keys, is the same attention, converts exactly and copies no cache.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    original = model.config._attn_implementation
    if original != "sdpa" or kv_heads == heads:
        yield
        return
    AttentionInterface.register(FOLDED_ATTENTION, _folded_gqa_sdpa)
    AttentionMaskInterface.register(FOLDED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FOLDED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def _folded_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention with the query heads of each kv head folded into the query axis."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    if groups == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        # Causal without a mask or per-head masks: the stock path (our wrappers always pass a mask).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    # Query head h = kv * groups + g (repeat_kv's order) goes to rows g * length .. of kv head kv.
    folded = query.reshape(b, kv_heads, groups * length, dim)
    mask = attention_mask.expand(attention_mask.shape[0], groups, length, attention_mask.shape[-1])
    mask = mask.reshape(attention_mask.shape[0], 1, groups * length, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(b, heads, length, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def _encoder_module(model, names: dict, kind: str):
    import torch

    class EncoderWithMask(torch.nn.Module):
        """``forward(input_ids, attention_mask) -> {last_hidden_state}`` of a padded fixed-length input
        (keyword names: the spec's, as ``names`` maps the roles tokens / mask / hidden to them)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            out = self.model(input_ids=inputs[names["tokens"]], attention_mask=inputs[names["mask"]])
            return {names[ENCODER_OUTPUT[kind]]: encoder_output(out, kind)}

    return EncoderWithMask().eval()


# ---------------------------------------------------------------- conversion


def causal_plan(loaded, options: ExportOptions) -> tuple[int, list[int], list[str]]:
    """(max_context, prefill lengths, notes) after fitting the options to the model's limits."""
    text_cfg = loaded.config.get_text_config()
    notes = []
    limit = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
    max_context = int(options.max_context)
    if max_context < 2:
        raise SlmExportError(f"max_context {max_context} is too small", hint="use --max-context 64 or more")
    if limit and max_context > limit:
        notes.append(f"max_context lowered from {max_context} to the model's {limit} positions")
        max_context = int(limit)
    lengths = sorted({int(n) for n in options.prefill_lengths if 1 < int(n) <= max_context})
    dropped = sorted({int(n) for n in options.prefill_lengths} - set(lengths))
    if dropped:
        notes.append(f"prefill lengths {dropped} dropped (each must be in 2..max_context={max_context})")
    if not lengths:  # every requested length exceeds the context: one prefill of the whole context
        lengths = [max_context]
        notes.append(f"prefill signature of {max_context} tokens (the whole context) used instead")
    return max_context, lengths, notes


def convert_causal_lm(loaded, spec: dict, model=None) -> bytes:
    """fp32 .tflite bytes with the signatures of ``spec`` (``prefill_<N>``, ``decode``) over an explicit
    KV cache of ``spec["max_context"]`` slots, tensors named as its contract says.

    ``model`` replaces ``loaded.model`` (a numerically equivalent copy prepared for a recipe)."""
    import torch

    model = model if model is not None else loaded.model
    names, cache_names = roles(spec), spec["cache"]["inputs"]
    wrapper = _explicit_cache_classes()(model, names, cache_names).eval()
    shape = (1, spec["num_kv_heads"], spec["max_context"], spec["head_dim"])
    cache = {name: torch.zeros(shape) for name in cache_names}

    def sample(n: int) -> dict:
        return {names["tokens"]: torch.zeros(1, n, dtype=torch.int32),
                names["positions"]: torch.arange(n, dtype=torch.int32), **cache}

    import litert_torch

    converter = litert_torch.Converter()
    for signature, n in spec["signatures"].items():
        converter.signature(signature, wrapper, sample_kwargs=sample(n))
    with folded_gqa_attention(model):  # the signatures are traced in convert()
        return _run_converter(converter, loaded)


def encoder_lengths(max_len: int) -> list[int]:
    """Signature lengths of an encoder: a few fixed sizes up to ``max_len``, so a short input does not pay
    for the longest (one 512-token signature made a 64-token call cost 1.6 s instead of ~0.1 s)."""
    return sorted({n for n in (32, 128) if n < max_len} | {max_len})


def convert_encoder(loaded, spec: dict) -> bytes:
    """fp32 .tflite bytes with the ``encode_<N>`` signatures of ``spec`` (inputs padded to N)."""
    import litert_torch
    import torch

    names = roles(spec)
    module = _encoder_module(loaded.model, names, loaded.kind)
    converter = litert_torch.Converter()
    for signature, n in spec["signatures"].items():
        sample = {names["tokens"]: torch.zeros(1, n, dtype=torch.int32),
                  names["mask"]: torch.ones(1, n, dtype=torch.int32)}
        converter.signature(signature, module, sample_kwargs=sample)
    return _run_converter(converter, loaded)


def _run_converter(converter, loaded) -> bytes:
    import torch

    try:
        with quiet(env=_QUIET_CONVERTER), torch.no_grad():
            return bytes(converter.convert().model_content())
    except Exception as e:  # litert-torch raises torch.export, MLIR and converter errors of many types
        raise ExportFailedError(
            f"litert-torch could not convert this {loaded.config.model_type} model: {condense(e, limit=400)}",
            hint="an op or control flow of this architecture has no LiteRT lowering; try --format onnx "
            "or --format pte, or a litert-torch release that supports it",
        ) from None


# ---------------------------------------------------------------- the format


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "litert-lm-builder"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class TFLiteFormat(Format):
    name = "tflite"
    description = "LiteRT .tflite (litert-torch): prefill/decode signatures with an explicit KV cache"
    recipes = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight")
    # All-integer int8 is built for the microcontroller target's distilled classifier (exporter/mcu/).
    recipe_notes = {"int8-full": "--target mcu"}

    def build(self, loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
        """Convert with litert-torch (fp32), then apply ``recipe`` with ai-edge-quantizer."""
        from exporter.formats import tflite_quant

        self.check(loaded.kind, recipe, loaded.family)
        tflite_quant.check_options(recipe, loaded, options)  # refuse before the slow conversion
        if loaded.kind == "causal-lm":
            fp32, spec, notes = self._convert_causal(loaded, recipe, options)
        else:
            fp32, spec, notes = self._convert_encoder(loaded, recipe, options)
        data = fp32
        if recipe != "fp32":
            with task(options.progress, f"export: quantizing with ai-edge-quantizer ({recipe})"):
                data, quant_notes = tflite_quant.apply(recipe, fp32, spec, loaded, options)
            notes += quant_notes
        (Path(out_dir) / MODEL_FILE).write_bytes(data)
        spec["converter"] = _versions()
        if loaded.kind == "causal-lm":
            self._pack_litertlm(loaded, spec, Path(out_dir), options, notes)
        return Artifact("tflite", recipe, [MODEL_FILE], spec, notes)

    @staticmethod
    def _pack_litertlm(loaded, spec: dict, out_dir: Path, options: ExportOptions, notes: list[str]) -> None:
        """``model.litertlm`` beside the .tflite, for LiteRT-LM (``exporter/formats/litertlm.py``).

        It is not one of the artifact's files (the size against fp32 and the parity are model.tflite's);
        the manifest hashes it like every file of the bundle, and runtime.json names it."""
        from exporter.formats import litertlm

        with task(options.progress, f"export: packing {litertlm.LITERTLM_FILE} for LiteRT-LM (litert-lm-builder)"):
            notes += litertlm.build(loaded, spec, out_dir / MODEL_FILE, out_dir / litertlm.LITERTLM_FILE)
        if (out_dir / litertlm.LITERTLM_FILE).is_file():
            spec["litertlm"] = litertlm.LITERTLM_FILE

    @staticmethod
    def _convert_causal(loaded, recipe: str, options: ExportOptions) -> tuple[bytes, dict, list[str]]:
        from exporter.formats import tflite_quant

        max_context, lengths, notes = causal_plan(loaded, options)
        model, prep_notes, source = tflite_quant.prepare_model(recipe, loaded, options)
        notes += prep_notes
        spec = causal_lm_spec(loaded, "tflite", MODEL_FILE, recipe, max_context=max_context,
                              prefill_lengths=lengths, pad_token_id=0)
        if source is not None:  # read by the int4 quantizer (tflite_quant._int4_weight)
            spec["source_grid"] = source.as_dict()
        spec.update(contract_fields("tflite", "causal-lm", spec["num_layers"], max_context, lengths))
        with task(options.progress, f"export: converting to LiteRT (litert-torch), prefill {lengths} + decode, "
                                    f"context {max_context}"):
            return convert_causal_lm(loaded, spec, model), spec, notes

    @staticmethod
    def _convert_encoder(loaded, recipe: str, options: ExportOptions) -> tuple[bytes, dict, list[str]]:
        length = min(int(options.max_context), int(getattr(loaded.config, "max_position_embeddings", 512)))
        lengths = encoder_lengths(length)
        pad = loaded.tokenizer.pad_token_id
        spec = encoder_spec(loaded, "tflite", MODEL_FILE, recipe, max_context=length,
                            pad_token_id=int(pad) if pad is not None else 0)
        spec.update(contract_fields("tflite", loaded.kind, lengths=lengths))
        with task(options.progress, f"export: converting to LiteRT (litert-torch), encode signatures of {lengths} tokens"):
            return convert_encoder(loaded, spec), spec, []


register(TFLiteFormat())
