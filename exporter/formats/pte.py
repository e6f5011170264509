"""ExecuTorch ``.pte``: the model lowered to XNNPACK, laid out for ExecuTorch's own LLM runners.

A causal LM is exported the way ExecuTorch's LLM export and optimum-executorch do it: transformers'
``TorchExportableModuleWithStaticCache`` holds a static KV cache of ``max_context`` positions as
mutable buffers, and the program's method is::

    forward(tokens: int64 [1, seq], input_pos: int64 [seq]) -> logits float32 [1, seq, vocab]

with a dynamic ``seq`` (1 .. max_seq_len), so one method does chunked prefill and decoding. The
constant methods ExecuTorch's LLM runner reads (``extension/llm/runner/constants.h``:
get_max_seq_len, get_max_context_len, get_bos_id, get_eos_ids, get_vocab_size, use_kv_cache,
enable_dynamic_shape, use_sdpa_with_kv_cache) are written too, so the file runs in the C++
``llama_main`` runner and the Android demo app as well as in ``exporter/runtime/pte_runner.py``.

An encoder is exported as ``forward(input_ids: int64 [1, seq]) -> last_hidden_state [1, seq, hidden]``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

from exporter.errors import ExportFailedError, UnsupportedRecipeError, condense
from exporter.formats import Artifact, ExportOptions, Format, causal_lm_spec, encoder_output, encoder_spec, register
from exporter.progress import task
from exporter.runtime.spec import contract_fields
from exporter.texts import calibration_windows

ARTIFACT = "model.pte"
EXECUTORCH_PIP = "executorch==1.5.1"
# A static KV cache is allocated in full on the device; beyond this the export is refused.
KV_CACHE_BYTES_MAX = 2 << 30


class PteFormat(Format):
    name = "pte"
    description = "ExecuTorch program lowered to XNNPACK (static KV cache, ExecuTorch LLM-runner metadata)"
    recipes = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight")
    kinds = ("causal-lm", "encoder", "sequence-classifier")

    def build(self, loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
        """Export, quantize with ``recipe``, lower to XNNPACK and write ``model.pte`` into ``out_dir``."""
        self.check(loaded.kind, recipe, loaded.family)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if loaded.kind == "causal-lm":
            return _build_causal(loaded, recipe, options, out_dir)
        return _build_encoder(loaded, recipe, options, out_dir)


# ---------------------------------------------------------------- causal LMs


def check_context(loaded, max_context: int) -> dict:
    """Refuse a ``max_context`` the model cannot hold; return the KV-cache geometry."""
    cfg = loaded.config.get_text_config()
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_context < 2:
        raise UnsupportedRecipeError(f"max context {max_context} is too small for a KV cache",
                                     hint="use --max-context 2 or more (512 is the default)")
    if positions and max_context > positions:
        raise UnsupportedRecipeError(
            f"max context {max_context} exceeds the {positions} positions {cfg.model_type} was built for",
            hint=f"use --max-context {positions} or less",
        )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * max_context * 4
    if kv_bytes > KV_CACHE_BYTES_MAX:
        raise UnsupportedRecipeError(
            f"a static KV cache of {max_context} positions needs {kv_bytes / 2**30:.1f} GiB "
            f"for this model (limit {KV_CACHE_BYTES_MAX / 2**30:.0f} GiB)",
            hint="lower --max-context",
        )
    return {"kv_cache_bytes": kv_bytes}


def check_recipe_inputs(recipe: str, options: ExportOptions) -> None:
    """Refuse, before the slow export, recipe inputs that cannot work (no calibration text, bad group size)."""
    if recipe == "int8-static" and not any(t.strip() for t in options.calibration_texts):
        raise UnsupportedRecipeError("recipe int8-static needs calibration text, and none was given",
                                     hint="pass --calibration FILE with a few paragraphs of typical text")
    if recipe == "int4-weight" and options.group_size <= 0:
        raise UnsupportedRecipeError(f"group size {options.group_size} is not positive",
                                     hint="use --group-size 32 (or 64, 128, 256)")


def _static_cache_module(model, max_context: int):
    """``forward(tokens, input_pos) -> logits`` over transformers' exportable static-cache module."""
    import torch
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.config.use_cache = True
    # The transformers module reads the cache settings from the generation config (a copy here).
    model.generation_config = GenerationConfig(
        **{k: v for k, v in model.generation_config.to_dict().items() if not k.startswith("_")}
    ) if model.generation_config is not None else GenerationConfig()
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": max_context}
    # Sliding-window layers (Gemma-3) get full-length static layers here too (transformers swaps its
    # ring-buffer layer, whose Python-int length cannot be exported, for a plain StaticLayer), and
    # transformers' sliding mask hides slots older than the window: exact past the window
    # (tests/test_gemma3.py). The cost is a cache of max_context slots on sliding layers as well.
    inner = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_context)

    class LLMForward(torch.nn.Module):
        # Positional names as in ExecuTorch's Llama export: the runner feeds (tokens, input_pos).
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, tokens, input_pos):
            # The cache layers hold their own references to the tensors registered as buffers; point
            # them at the buffers as the module sees them now. Eagerly these are the same tensors;
            # under non-strict torch.export they are the traced buffers, so the cache updates are
            # recorded as buffer mutations (otherwise the cache is baked in as a constant).
            for i, layer in enumerate(self.inner.static_cache.layers):
                layer.keys = getattr(self.inner, f"key_cache_{i}")
                layer.values = getattr(self.inner, f"value_cache_{i}")
                layer.cumulative_length = getattr(self.inner, f"cumulative_length_{i}")
            return self.inner(input_ids=tokens, cache_position=input_pos)

    return LLMForward(inner).eval()


def llm_metadata(loaded, spec: dict, max_seq_len: int, max_context: int, custom_sdpa: bool = False) -> dict:
    """Constant methods read by ExecuTorch's LLM runner (names from extension/llm/runner/constants.h)."""
    cfg = loaded.config.get_text_config()
    bos = spec.get("bos_token_id")
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    meta = {
        "get_max_seq_len": int(max_seq_len),
        "get_max_context_len": int(max_context),
        "get_vocab_size": int(spec["vocab_size"]),
        "get_eos_ids": [int(e) for e in spec["eos_token_ids"]],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": bool(custom_sdpa),
        "get_n_layers": int(spec["num_layers"]),
        "get_max_batch_size": 1,
    }
    if bos is not None:
        meta["get_bos_id"] = int(bos)
    return meta


def _build_causal(loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
    import torch

    from exporter.formats import pte_attention, pte_layers, pte_quant

    max_context = int(options.max_context)
    geometry = check_context(loaded, max_context)
    check_recipe_inputs(recipe, options)
    max_seq_len = max_context - 1  # the seq dim must stay below the cache length to stay symbolic
    t0 = time.perf_counter()
    with task(options.progress, f"export: preparing the {recipe} model for ExecuTorch"):
        model = copy.deepcopy(loaded.model).eval()
        model, skipped, source = _prepare(model, recipe, options.group_size, loaded.family)
    custom_sdpa = pte_attention.supported(loaded, max_context)
    if custom_sdpa:
        pte_attention.use_custom_sdpa(model)
    # After the eager quantization, so the new linear ops stay float (see pte_layers.py).
    whole_layers = recipe not in pte_quant.PT2E_RECIPES and pte_layers.supported(loaded)
    if whole_layers:
        pte_layers.use_linear_mean_rmsnorm(model)
    module = _static_cache_module(model, max_context)

    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros((1, 3), dtype=torch.long), torch.arange(3, dtype=torch.long))
    dynamic_shapes = ({1: seq}, {0: seq})
    with torch.no_grad():
        # Non-strict: several times faster than dynamo's strict tracing, same operators (see LLMForward).
        with task(options.progress, "export: torch.export"), \
                pte_layers.rotate_half_as_linear(model) if whole_layers else contextlib.nullcontext():
            ep = _guard(lambda: torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False),
                        "torch.export", recipe)
        if recipe in pte_quant.PT2E_RECIPES:
            with task(options.progress, f"export: {recipe} quantization (PT2E, calibrated)"):
                calib = _causal_calibration(loaded, recipe, options, max_seq_len, example)
                gm = _guard(lambda: pte_quant.pt2e_quantize(ep.module(), recipe, calib), "quantization", recipe)
                ep = _guard(lambda: torch.export.export(gm, example, dynamic_shapes=dynamic_shapes, strict=False),
                            "torch.export (quantized)", recipe)

    spec = causal_lm_spec(loaded, "pte", ARTIFACT, recipe, max_context=max_context, max_seq_len=max_seq_len)
    metadata = llm_metadata(loaded, spec, max_seq_len, max_context, custom_sdpa)
    with task(options.progress, "export: lowering to XNNPACK and writing the .pte"):
        size, delegates = _lower_and_write(ep, recipe, metadata, out_dir / ARTIFACT)
    spec.update(contract_fields("pte", "causal-lm", spec["num_layers"], max_context))
    spec.update({
        "backend": "xnnpack",
        "group_size": options.group_size if recipe == "int4-weight" else None,
        "constant_methods": metadata,
        "kv_cache_bytes": geometry["kv_cache_bytes"],
        "runtime_pip": EXECUTORCH_PIP,
        # Kernel libraries beyond the portable set that the program calls (the runner loads them).
        "custom_ops": [pte_attention.CUSTOM_OPS] if custom_sdpa else [],
    })
    notes = [_summary(recipe, size, delegates, time.perf_counter() - t0)]
    notes.append("attention: ExecuTorch's llama::custom_sdpa kernel (reads only the filled cache)" if custom_sdpa
                 else "attention: transformers' static-cache attention (custom_sdpa does not fit this model)")
    if whole_layers:
        notes.append("RMSNorm and rotary embedding written as linear ops so XNNPACK takes them (pte_layers.py)")
    if source is not None:
        notes.append(source.note())
        spec["source_grid"] = source.as_dict()
    elif recipe == "int4-weight":
        eight = [n for n, r in pte_quant.linear_rules(loaded.model, recipe, loaded.family).items() if r and r.weights == "int8"]
        notes.append(f"int4-weight (8da4w) follows the pte plan: {len(eight)} linear layers with 8-bit weights "
                     f"({', '.join(sorted({loaded.family.role_of(n) or n for n in eight}))}), the others 4-bit; "
                     "the token embedding stays float32 (`slm-export recipes --explain int4-weight`)")
    if skipped:
        notes.append(f"{len(skipped)} linear layers stay float32: group size {options.group_size} does not "
                     f"divide their input width ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})")
    return Artifact(format="pte", recipe=recipe, files=[ARTIFACT], spec=spec, notes=notes)


def _prepare(model, recipe: str, group_size: int, family):
    """Eager part of the recipe; returns (model, names of linear layers int4-weight had to skip, the
    source-grid plan or None)."""
    from exporter.formats import pte_quant

    skipped = []
    if recipe == "int4-weight":
        four_bit = [n for n, r in pte_quant.linear_rules(model, recipe, family).items() if r and r.weights == "int4"]
        four = set(four_bit)
        widths = {n: m.in_features for n, m in model.named_modules() if n in four}
        skipped = [n for n in four_bit if widths[n] % group_size]
        if four_bit and len(skipped) == len(four_bit):
            raise UnsupportedRecipeError(
                f"group size {group_size} divides the input width of no linear layer; int4-weight would quantize nothing",
                hint="use --group-size 32 (or a divisor of the hidden size)",
            )
    model, source = _guard(lambda: pte_quant.prepare_eager(model, recipe, group_size, family), "quantization", recipe)
    return model, skipped, source


def _causal_calibration(loaded, recipe: str, options: ExportOptions, max_seq_len: int, example) -> list:
    import torch

    from exporter.formats import pte_quant

    if recipe == "int8-dynamic":
        return [example]  # dynamic activations: one run feeds the weight observers
    windows = calibration_windows(loaded.tokenizer, options.calibration_texts,
                                  min(max_seq_len, 128), options.calibration_samples)
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise UnsupportedRecipeError("the calibration text is shorter than two tokens",
                                     hint="give a longer --calibration file")
    # Each window starts at position 0: it overwrites the cache from the start, as a new prompt does.
    return pte_quant.calibration_batches(
        windows, lambda w: (torch.tensor([w], dtype=torch.long), torch.arange(len(w), dtype=torch.long))
    )


# ---------------------------------------------------------------- encoders


def _build_encoder(loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
    import torch

    from exporter.formats import pte_quant

    check_recipe_inputs(recipe, options)
    positions = int(getattr(loaded.config, "max_position_embeddings", 512))
    max_len = min(int(options.max_context), positions)
    t0 = time.perf_counter()
    model, _, _ = _prepare(copy.deepcopy(loaded.model).eval(), recipe, options.group_size, loaded.family)
    kind = loaded.kind

    class EncoderForward(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return encoder_output(self.m(input_ids=input_ids), kind)

    module = EncoderForward(model).eval()
    seq = torch.export.Dim("seq", min=1, max=max_len)
    example = (torch.ones((1, 4), dtype=torch.long),)
    with torch.no_grad():
        ep = _guard(lambda: torch.export.export(module, example, dynamic_shapes=({1: seq},), strict=False),
                    "torch.export", recipe)
        if recipe in pte_quant.PT2E_RECIPES:
            calib = [example]
            if recipe == "int8-static":
                windows = calibration_windows(loaded.tokenizer, options.calibration_texts,
                                              min(max_len, 128), options.calibration_samples)
                calib = [(torch.tensor([w], dtype=torch.long),) for w in windows] or calib
            gm = _guard(lambda: pte_quant.pt2e_quantize(ep.module(), recipe, calib), "quantization", recipe)
            ep = _guard(lambda: torch.export.export(gm, example, dynamic_shapes=({1: seq},), strict=False),
                        "torch.export (quantized)", recipe)
    size, delegates = _lower_and_write(ep, recipe, {"get_max_seq_len": max_len}, out_dir / ARTIFACT)
    spec = encoder_spec(loaded, "pte", ARTIFACT, recipe, max_context=max_len, backend="xnnpack",
                        runtime_pip=EXECUTORCH_PIP, **contract_fields("pte", loaded.kind))
    notes = [_summary(recipe, size, delegates, time.perf_counter() - t0)]
    return Artifact(format="pte", recipe=recipe, files=[ARTIFACT], spec=spec, notes=notes)


# ---------------------------------------------------------------- lowering


def _lower_and_write(ep, recipe: str, metadata: dict, path: Path) -> tuple[int, int]:
    """Lower ``ep`` to XNNPACK with ``metadata`` as constant methods; write the program atomically.

    Returns (file size, number of XNNPACK delegates).
    """
    from executorch.backends.xnnpack.utils.configs import (
        get_xnnpack_edge_compile_config,
        get_xnnpack_executorch_backend_config,
    )
    from executorch.exir import to_edge_transform_and_lower

    from exporter.formats import pte_passes, pte_quant

    def lower():
        pte_passes.static_view_shapes(ep)
        with pte_passes.skip_inapplicable_passes():
            edge = to_edge_transform_and_lower(
                ep,
                partitioner=[pte_passes.decompose_once(p) for p in pte_quant.partitioners(recipe)],
                compile_config=get_xnnpack_edge_compile_config(),
                constant_methods=metadata,
            )
            return edge.to_executorch(get_xnnpack_executorch_backend_config())

    program = _guard(lower, "XNNPACK lowering", recipe)
    tmp = path.with_suffix(".pte.part")
    with open(tmp, "wb") as f:
        program.write_to_file(f)
    tmp.replace(path)
    # Fewer delegates: faster lowering and fewer hand-overs between XNNPACK and portable kernels.
    return path.stat().st_size, len(program.executorch_program.execution_plan[0].delegates)


def _summary(recipe: str, size: int, delegates: int, seconds: float) -> str:
    return f"pte {recipe}: {size / 1e6:.1f} MB, {delegates} XNNPACK delegates, exported and lowered in {seconds:.0f} s"


def _guard(fn, stage: str, recipe: str):
    """Run ``fn``; turn a converter exception into one ExportFailedError naming the stage."""
    try:
        return fn()
    except (UnsupportedRecipeError, ExportFailedError):
        raise
    except Exception as e:  # torch.export / exir raise many exception types
        raise ExportFailedError(
            f"ExecuTorch {stage} failed for recipe {recipe}: {condense(e)}",
            hint="try another --recipe (fp32 always lowers), or run with --debug for the full trace",
        ) from e


register(PteFormat())
