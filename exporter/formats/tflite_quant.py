"""The TFLite recipe family: ai-edge-quantizer recipes applied to the converted fp32 flatbuffer.

  fp16          fp16 weights (FLOAT_CASTING), dequantized to float32 at load; compute stays float32
  int8-dynamic  per-channel int8 weights, activations quantized on the fly by the kernels
                (ai-edge-quantizer's ``dynamic_wi8_afp32``)
  int8-static   SmoothQuant-smoothed model; per-channel int8 weights and int8 activations calibrated
                on text, on the FULLY_CONNECTED ops only (see ``_int8_static``)
  int4-weight   blockwise 4-bit weights (block = ``ExportOptions.group_size``), dynamic activations
                (``dynamic_wi4b<group>_afp32``); MLP down projections int8
"""

from __future__ import annotations

import os
import re

import numpy as np

from exporter import source_grid
from exporter.errors import SlmExportError, UnsupportedRecipeError, condense
from exporter.quiet import quiet
from exporter.runtime.spec import decode_signature, roles

_BLOCK_SIZES = (32, 64, 128, 256)  # the block sizes ai-edge-quantizer's QuantGranularity offers
_DECODE_STEPS_PER_WINDOW = 4
_NEVER = r"(?!)"  # a regex that matches no tensor (a rule whose role the model lacks)


def check_options(recipe: str, loaded, options) -> None:
    """Refuse, before conversion, options this recipe family cannot honour."""
    if recipe == "int4-weight" and options.group_size not in _BLOCK_SIZES:
        raise UnsupportedRecipeError(
            f"tflite int4-weight cannot use group size {options.group_size}",
            hint=f"ai-edge-quantizer offers blocks of {', '.join(map(str, _BLOCK_SIZES))}; e.g. --group-size 32",
        )
    if recipe == "int8-static" and not options.calibration_texts:
        raise SlmExportError("int8-static needs calibration text; none was given",
                             hint="pass --calibration FILE or use the built-in sample")


def apply(recipe: str, fp32: bytes, spec: dict, loaded, options) -> tuple[bytes, list[str]]:
    """``fp32`` quantized with ``recipe``; returns (flatbuffer bytes, notes for the report)."""
    from ai_edge_quantizer import quantizer

    rp, notes, calibrate = _RECIPES[recipe](spec, options, loaded)
    try:
        # ai-edge-quantizer prints size reports and logs a warning per weight buffer shared by several
        # signatures (each signature quantizes the same weights identically).
        with quiet():
            q = quantizer.Quantizer(bytearray(fp32), rp)
            result = None
            if calibrate:
                data = calibration_data(fp32, spec, loaded, options)
                result = q.calibrate(data, num_threads=os.cpu_count() or 1)
            out = q.quantize(result, enable_progress_bar=False, enable_progress_report=False).quantized_model
    except SlmExportError:
        raise
    except Exception as e:  # ai-edge-quantizer raises ValueError/RuntimeError on ops it cannot handle
        raise UnsupportedRecipeError(
            f"ai-edge-quantizer cannot apply {recipe} to this {spec.get('model_type')} model: {condense(e, limit=400)}",
            hint="try another recipe (int8-dynamic and fp16 quantize only weights and are the most robust)",
        ) from None
    return bytes(out), notes


# ---------------------------------------------------------------- plans -> ai-edge-quantizer scopes


def scope_regex(model, paths: list[str]) -> str:
    """A regex matching the TFLite tensor names litert-torch gives the ops of the modules at ``paths``.

    litert-torch names a tensor after the chain of modules that produced it, ``<Class>_<attribute>``
    per level below the wrapper (whose HF model attribute is ``model``), with ModuleList containers
    left out (their children appear under their index): ``model.layers.0.mlp.down_proj`` becomes
    ``..._model/..._model/...Layer_0/..._mlp/..._down_proj``. ai-edge-quantizer selects ops by a regex
    on these names, so a plan's rule is turned into one exact alternative per module.
    """
    import torch

    if not paths:
        return _NEVER
    modules = dict(model.named_modules())
    alternatives = []
    for path in paths:
        attrs, parts = ["model"], path.split(".")
        for i, part in enumerate(parts):
            if isinstance(modules.get(".".join(parts[:i + 1])), (torch.nn.ModuleList, torch.nn.ModuleDict)):
                continue
            attrs.append(part)
        alternatives.append("(?:^|/)" + "/".join(rf"[^/;]*_{re.escape(a)}" for a in attrs) + r"(?:[/;]|$)")
    return "|".join(alternatives)


def _role_paths(loaded, recipe: str, match: str) -> list[str]:
    """Module paths of the linears (or embeddings) the tflite plan's rule ``match`` takes."""
    from exporter.recipes import get_recipe, layer_rules

    return [name for name, (_, rule, _) in layer_rules(get_recipe(recipe), "tflite", loaded.family, loaded.model).items()
            if rule is not None and rule.match == match]


# ---------------------------------------------------------------- recipes


def _manager():
    from ai_edge_quantizer import recipe_manager

    return recipe_manager.RecipeManager()


def _fp16(spec, options, loaded):
    from ai_edge_quantizer import algorithm_manager, qtyping

    rm = _manager()
    rm.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    return rm.get_quantization_recipe(), ["fp16 weights; compute, inputs, outputs (and a KV cache) stay float32"], False


def _int8_dynamic(spec, options, loaded):
    from ai_edge_quantizer import recipe

    return recipe.dynamic_wi8_afp32(), ["int8 per-channel weights, activations quantized at run time"], False


def _int4_weight(spec, options, loaded):
    from ai_edge_quantizer import algorithm_manager, qtyping

    rm = _manager()
    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    blocks = qtyping.QuantGranularity(f"BLOCKWISE_{options.group_size}")
    # Weight-only blockwise int4 is a no-op in ai-edge-quantizer 0.10 (measured: the flatbuffer
    # comes back unchanged), so 4-bit blocks are applied with dynamic activations, as on XNNPACK.
    # Embedding and LM head share the 4-bit blocks (one buffer when tied).
    rm.add_dynamic_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=4, granularity=blocks)
    # The plan's 8-bit layers (the MLP down projections) stay int8 per channel, as llama.cpp's Q4_K_M keeps
    # its most sensitive tensors at higher precision: measured on SmolLM2, all-4-bit gave 0.48 top-1
    # agreement (min-max, OCTAV and Hadamard-rotated scales alike), int8 down projections 0.60.
    source = spec.get("source_grid") or {}
    carried = set(source.get("carried", ()))
    down = [p for p in _role_paths(loaded, "int4-weight", "down") if p not in carried]
    eight = down + list(source.get("finer_than_4bit", ()))
    if carried:
        # A quantized source (exporter/source_grid.py): its 4-bit blocks are recovered as they are by
        # ai-edge-quantizer's DEQUANTIZED_WEIGHT_RECOVERY (scale = the block's step, codes exact); what it
        # holds finer (and the embedding with a head tied to it) gets 8 bits; the block-offset term stays float.
        # The lm_head's op is named after the signature's output ("decode_logits_output"), not its module.
        embed = [n for n, m in loaded.model.named_modules() if loaded.family.role_of(n) == "embed"]
        head = rf"(?:^|;)[^;/]*_{re.escape(roles(spec)['logits'])}_output;"  # op scopes end in ';'
        rm.add_dynamic_config(f"{scope_regex(loaded.model, embed)}|{head}", qtyping.TFLOperationName.ALL_SUPPORTED,
                              num_bits=8)
    rm.add_dynamic_config(scope_regex(loaded.model, eight), fc, num_bits=8)
    if carried:
        rm.add_dynamic_config(scope_regex(loaded.model, sorted(carried)), fc, num_bits=4, granularity=blocks,
                              algorithm_key=algorithm_manager.AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY)
        rm.add_quantization_config(rf"BlockOffsets_{source_grid.OFFSETS}", qtyping.TFLOperationName.ALL_SUPPORTED,
                                   algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
        return rm.get_quantization_recipe(), [
            f"4-bit weights in blocks of {options.group_size}: {len(carried)} linears recovered from the source's "
            f"blocks, {len(eight)} linears and the embedding int8 per channel, activations quantized at run time"], False
    return rm.get_quantization_recipe(), [
        f"4-bit weights in blocks of {options.group_size} ({len(down)} MLP down projections int8 per channel), "
        "activations quantized at run time"], False


def _int8_static(spec, options, loaded):
    from ai_edge_quantizer import qtyping

    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    rm = _manager()
    # Only FULLY_CONNECTED gets int8 activations: the attention scores, mask, softmax, norms and the
    # residual adds stay float32 (a per-tensor int8 range over the masked scores or the residual
    # stream is what collapsed a naively calibrated Llama to 0.44 top-1). The model was smoothed
    # first (``smooth_model``) to move channel outliers into the weights.
    rm.add_static_config(".*", fc, activation_num_bits=8, weight_num_bits=8)
    # The MLP down projection's input carries token-specific outliers (a few tokens, e.g. the first,
    # reach values thousands of times the rest) that neither a static range nor smoothing can hold:
    # measured on SmolLM2, static int8 everywhere gave 0.40 top-1 agreement, with these layers'
    # activations quantized per token at run time (int8 dynamic) 0.82.
    down = _role_paths(loaded, "int8-static", "down")
    rm.add_dynamic_config(scope_regex(loaded.model, down), fc, num_bits=8)
    # The token embedding gets int8 weights too (float output, like int8-dynamic): with a tied LM head
    # its one buffer feeds both the lookup and the head's FULLY_CONNECTED, and a float lookup next to
    # an int8 head made the quantizer copy that buffer for every signature (3x the size).
    rm.add_dynamic_config(".*", qtyping.TFLOperationName.EMBEDDING_LOOKUP, num_bits=8)
    return rm.get_quantization_recipe(), [
        f"int8 weights and calibrated static int8 activations on fully-connected ops (up to "
        f"{options.calibration_samples} text windows); {len(down)} MLP down projections use per-token dynamic "
        "int8 activations; attention, norms and residuals stay float32"], True


_RECIPES = {"fp16": _fp16, "int8-dynamic": _int8_dynamic, "int8-static": _int8_static, "int4-weight": _int4_weight}


# ---------------------------------------------------------------- smoothing (before conversion)

_SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: half of the outlier range moves into weights


# The value written into an all-zero weight row before int4 quantization (see ``_without_zero_rows``).
_ZERO_ROW_NUDGE = 1e-6


def prepare_model(recipe: str, loaded, options):
    """(torch model to convert, notes, source-grid plan or None): a SmoothQuant copy for int8-static; for
    int4-weight a copy without all-zero weight rows (when the model has any) whose linears on a quantized
    source's 4-bit blocks keep them (``exporter.source_grid``); else ``loaded.model`` itself."""
    if recipe == "int4-weight":
        model, notes = _without_zero_rows(loaded.model)
        # Embeddings are no part of the source plan: ai-edge-quantizer's lookup has no offset term (a
        # tied head follows its embedding, see ``_int4_weight``).
        source = (source_grid.plan_for_format(loaded.model, loaded.family, recipe, "tflite", options.group_size)
                  if loaded.kind == "causal-lm" else None)
        if source is None:
            return model, notes, None
        import copy

        model = copy.deepcopy(model) if model is loaded.model else model
        source_grid.carry_plan(model, source)
        return model, notes + [source.note()], source
    return (*_smoothed(loaded, options, recipe), None)


def _smoothed(loaded, options, recipe: str):
    if recipe != "int8-static" or loaded.kind != "causal-lm":
        return loaded.model, []
    options.progress("smoothing activation outliers into the weights (SmoothQuant) for int8-static")
    model, count = smooth_model(loaded, options)
    if not count:
        return loaded.model, [f"no SmoothQuant pattern known for {loaded.config.model_type}; calibrated as is"]
    return model, [f"SmoothQuant (alpha {_SMOOTH_ALPHA}) on {count} norm/linear pairs before conversion"]


def _without_zero_rows(model):
    """A copy whose all-zero weight rows hold one tiny value, if the model has such rows.

    A padding token's embedding row is often exactly zero; with tied embeddings that is an output
    channel of the lm_head too, whose blockwise int4 scale is then 0, and LiteRT's XNNPACK delegate
    refuses the whole model ("unsupported scale value (0.000000) ... for INT4 tensor"). 1e-6 in every
    element of the row changes that token's embedding and logit by far less than 4-bit rounding does.
    """
    import copy

    import torch

    def zero_rows(w):
        return (w.detach().abs().amax(dim=-1) == 0).nonzero().flatten()

    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    if not any(len(zero_rows(w)) for w in weights):
        return model, []
    model = copy.deepcopy(model)
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                rows = zero_rows(m.weight)
                m.weight[rows] = _ZERO_ROW_NUDGE  # every block of the row needs a non-zero scale
                count += len(rows)
    return model, [f"{count} all-zero weight rows (e.g. the padding token's embedding) set to {_ZERO_ROW_NUDGE:g} "
                   ": XNNPACK refuses an int4 channel whose scale is 0"]


def smooth_model(loaded, options, alpha: float = _SMOOTH_ALPHA, window: int = 128):
    """A copy of the model with activation outliers migrated into the weights (SmoothQuant).

    LLM activations have a few channels hundreds of times larger than the rest, so one per-tensor
    int8 scale leaves the other channels a handful of levels. For each linear layer fed by a norm
    (or by ``up_proj`` through the SwiGLU product), input channel j is divided by
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha) in the producer and multiplied back into the weight's
    column j: the float function is unchanged, the activations become int8-friendly and the
    per-channel int8 weights absorb the range. Returns (model copy, number of smoothed groups).
    """
    import copy

    import torch

    from exporter.texts import calibration_windows

    model = copy.deepcopy(loaded.model).eval()
    groups = _smoothing_groups(model, loaded.family)
    if not groups:
        return model, 0
    stats: dict = {}

    def hook(module, inputs, output):
        amax = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
        stats[module] = torch.maximum(stats[module], amax) if module in stats else amax

    handles = [linears[0].register_forward_hook(hook) for _, linears in groups]
    try:
        windows = calibration_windows(loaded.tokenizer, options.calibration_texts, window, options.calibration_samples)
        with torch.no_grad():
            for ids in windows:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for producer, linears in groups:
            if linears[0] not in stats:
                continue
            w_max = torch.cat([lin.weight.abs() for lin in linears]).amax(dim=0)
            s = (stats[linears[0]].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            if isinstance(producer, torch.nn.Linear):  # up_proj: scale its output rows
                producer.weight.div_(s[:, None])
            else:  # RMSNorm / LayerNorm: scale the elementwise weight (and bias)
                producer.weight.div_(s)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s)
            for lin in linears:
                lin.weight.mul_(s[None, :])
    return model, len(groups)


def _smoothing_groups(model, family=None) -> list:
    """[(producer, [linears fed by it])] per layer, from the family's SmoothQuant pairs (exporter/families)."""
    import torch

    if family is None or not family.smoothing:
        return []
    # (layer, role) -> module, built once: the pairs below look up a few roles in every layer.
    by_role = {(family.layer_of(n), family.role_of(n)): m for n, m in model.named_modules() if n}
    groups = []
    for index in sorted({layer for layer, _ in by_role if layer is not None}):
        for producer_role, consumer_roles in family.smoothing:
            producer = by_role.get((index, producer_role))
            consumers = [by_role.get((index, r)) for r in consumer_roles]
            if producer is None or any(c is None for c in consumers):
                continue
            if not all(isinstance(c, torch.nn.Linear) for c in consumers):
                return []
            if not isinstance(producer, torch.nn.Linear) and not _plain_norm(producer):
                continue  # e.g. Gemma's (1 + weight) RMSNorm: scaling its weight is not scaling its output
            groups.append((producer, consumers))
    # The LM head is left alone: with tied embeddings its weight is also the embedding table.
    return groups


def _plain_norm(module) -> bool:
    """A norm whose output is ``weight * normalised(x) (+ bias)``, so dividing its weight scales its output."""
    return getattr(module, "weight", None) is not None and not type(module).__name__.startswith("Gemma")


# ---------------------------------------------------------------- calibration


def calibration_data(fp32: bytes, spec: dict, loaded, options) -> dict[str, list[dict]]:
    """Inputs for every signature, {signature: [feeds]}, from token windows of the calibration text.

    Prefill signatures see each window from position 0 with an empty cache. Decode sees realistic
    caches: the float model prefills the first half of a window, then decodes the next few tokens,
    and each decode step's inputs (with the cache as it then is) become calibration samples.
    """
    from exporter.texts import calibration_windows

    if spec["kind"] != "causal-lm":  # an encoder or its classifier
        return _encoder_calibration(spec, loaded, options, calibration_windows)
    from ai_edge_litert.interpreter import Interpreter

    lengths = spec["prefill_lengths"]
    windows = calibration_windows(loaded.tokenizer, options.calibration_texts, max(lengths),
                                  options.calibration_samples)
    if not windows:
        raise SlmExportError("int8-static needs calibration text; the given text has no tokens")
    interp = Interpreter(model_content=fp32)
    runners = {name: interp.get_signature_runner(name) for name in spec["signatures"]}
    decode = decode_signature(spec["signatures"])
    prefill = {n: name for name, n in spec["signatures"].items() if name != decode}
    names, cache_names = roles(spec), spec["cache"]["inputs"]
    shape = (1, spec["num_kv_heads"], spec["max_context"], spec["head_dim"])
    empty = {name: np.zeros(shape, np.float32) for name in cache_names}
    data: dict[str, list[dict]] = {name: [] for name in spec["signatures"]}
    for window in windows:
        for n in lengths:
            data[prefill[n]].append(_feed(names, window[:n], 0, n, empty))
        half = max(1, len(window) // 2)
        n = min(x for x in lengths if x >= half) if half > 1 else None
        cache = empty
        if n is not None:
            out = runners[prefill[n]](**_feed(names, window[:half], 0, n, cache))
            cache = {name: out[name] for name in cache_names}
        for pos in range(half, min(len(window), half + _DECODE_STEPS_PER_WINDOW)):
            feed = _feed(names, window[pos:pos + 1], pos, 1, cache)
            data[decode].append(feed)
            out = runners[decode](**feed)
            cache = {name: out[name] for name in cache_names}
    return data


def _feed(names: dict, tokens: list[int], start: int, length: int, cache: dict) -> dict:
    ids = np.zeros((1, length), np.int32)
    ids[0, :len(tokens)] = tokens
    return {names["tokens"]: ids, names["positions"]: np.arange(start, start + length, dtype=np.int32), **cache}


def _encoder_calibration(spec, loaded, options, calibration_windows) -> dict[str, list[dict]]:
    names = roles(spec)
    data = {}
    for name, length in spec["signatures"].items():
        windows = calibration_windows(loaded.tokenizer, options.calibration_texts, length, options.calibration_samples)
        feeds = []
        for window in windows:
            ids = np.full((1, length), spec["pad_token_id"], np.int32)
            mask = np.zeros((1, length), np.int32)
            ids[0, :len(window)] = window
            mask[0, :len(window)] = 1
            feeds.append({names["tokens"]: ids, names["mask"]: mask})
        data[name] = feeds
    return data


def simulated_schemes(recipe: str, loaded, group_size: int, spec: dict) -> dict:
    """module path -> ``exporter.simulate.Scheme``: this format's quantization of ``recipe``, layer by layer.

    LiteRT's dynamic range kernels quantize a layer's input to int8 per row (token) at run time; the
    embedding table is quantized like the linears (``.*`` configs), except that with a carried source
    grid it and the LM head get 8 bits (``_int4_weight``).
    """
    from exporter import simulate

    style = {"rounding": "qmax", "bf16_scales": True}  # ai-edge-quantizer: m / qmax, 7-bit mantissa block scales
    if recipe == "fp32":
        return {}
    if recipe == "fp16":
        return simulate.half_schemes(loaded)
    if recipe == "int8-dynamic":
        return simulate.plan_schemes(recipe, "tflite", loaded, group_size, "token", embed=simulate.Scheme(8, **style),
                                     **style)
    if recipe == "int4-weight":
        source = spec.get("source_grid")
        embed = simulate.Scheme(8, **style) if source else simulate.Scheme(4, group_size, **style)
        schemes = simulate.plan_schemes(recipe, "tflite", loaded, group_size, "token", source=source, embed=embed,
                                        **style)
        if source:
            for name, _ in loaded.family.modules(loaded.model, "lm_head"):
                schemes[name] = simulate.Scheme(8, None, "token", **style)
        return schemes
    raise NotImplementedError(f"tflite {recipe} (calibrated activation ranges) is not simulated")
