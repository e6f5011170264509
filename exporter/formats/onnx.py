"""ONNX: one graph with a KV cache (dynamic batch, sequence and past length), run by onnxruntime.

Inputs ``input_ids``, ``attention_mask`` (past + new), ``position_ids``, ``past_key_values.{i}.key|value``
(batch_size, kv_heads, past_sequence_length, head_dim); outputs ``logits`` and ``present.{i}.key|value``.
These are the tensor and dimension names optimum and transformers.js use, so their runners and ours read
the same graph; the tensor names are spelt in ``exporter/runtime/spec.py`` and written into runtime.json.
An app prefills the prompt with an empty past (past length 0) and then feeds one token at a time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from exporter.errors import ExportFailedError, condense
from exporter.formats import Artifact, ExportOptions, Format, causal_lm_spec, encoder_output, encoder_spec, register
from exporter.progress import task
from exporter.quiet import quiet
from exporter.runtime.spec import contract_fields

MODEL_FILE = "model.onnx"
FP32_FILE = "model_fp32.onnx"  # the unquantized export, kept only in the staging folder
_TWO_GB = 2 * 1024**3  # protobuf's limit: larger graphs keep weights as external data


class KVCacheWrapper:
    """Builds the torch module that takes the KV cache as flat tensors (ONNX has no cache objects)."""

    @staticmethod
    def make(model):
        import torch

        num_layers = model.config.get_text_config().num_hidden_layers

        class _WithFlatCache(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = full_length_cache(self.model.config, past, num_layers)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=cache, use_cache=True)
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        return _WithFlatCache().eval()


def full_length_cache(config, past, num_layers: int):
    """A DynamicCache over the flat ``past`` tensors in which every layer keeps all its tokens.

    A DynamicCache built from the config gives sliding-window layers (Gemma-3, Qwen2 with a window)
    a cache cropped to the window, so their ``present`` tensors stop growing while the full-attention
    layers' do; the graph has one shared ``past`` axis, and onnxruntime fails (Expand: invalid shape)
    as soon as the context reaches the window. Plain layers keep every token, and transformers then
    sizes both masks by the whole past and applies the window in the sliding layers' mask
    (``kv_idx > q_idx - sliding_window``): the same attention as the cropped cache, at any length.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    # Only the sliding layers change: any other layer kind the config asks for stays as it is.
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    for i in range(num_layers):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


@contextlib.contextmanager
def untied_output_layer(model):
    """Give the output layer its own copy of tied embedding weights while exporting.

    A tied weight feeds both a Gather (embedding) and the lm_head MatMul through a Transpose, and
    onnxruntime's quantizers then leave the biggest MatMul of a small LM in float32. A private copy
    becomes a plain MatMul initializer that every quantizer handles.
    """
    import torch

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    if tied:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    try:
        yield tied
    finally:
        if tied:
            head.weight = emb.weight


def with_source_grid(loaded, source):
    """A copy of ``loaded`` whose carried linears are ``source_grid.GridLinear`` (the reference, the
    caller's model, stays as it is)."""
    import copy
    import dataclasses

    from exporter import source_grid

    model = copy.deepcopy(loaded.model).eval()
    source_grid.carry_plan(model, source)
    return dataclasses.replace(loaded, model=model)


def export_causal_lm(loaded, path: Path, spec: dict) -> None:
    """torch.onnx.export (dynamo) of the KV-cache graph with dynamic batch / seq / past dims, its
    tensors named as ``spec`` (the runtime.json of the build) says."""
    import torch

    n_layers, kv_heads, head_dim = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
    # Sample sizes above 1 so torch.export does not specialise a dimension to 0 or 1.
    b, s, p = 2, 3, 5
    ids = torch.randint(0, spec["vocab_size"], (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s)
    past = tuple(torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * n_layers))
    # optimum's dimension names: transformers.js sizes its empty first cache from the graph's input
    # shapes, resolving the symbol "batch_size" (any other symbol, as "past_sequence_length", is 0); a
    # batch dimension under another name gives it a (0, heads, 0, head_dim) cache that fails to reshape.
    batch, seq, past_len, total = (torch.export.Dim(n) for n in (
        "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"))
    # Keyed by the wrapper's argument names, which are not the graph's (those are input_names).
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in range(2 * n_layers)),
    }
    _export(
        KVCacheWrapper.make(loaded.model), (ids, mask, pos, *past), dynamic_shapes, path,
        input_names=spec["inputs"] + spec["cache"]["inputs"], output_names=spec["outputs"] + spec["cache"]["outputs"],
    )


def export_encoder(loaded, path: Path, spec: dict) -> None:
    """Encoder graph: input_ids, attention_mask -> last_hidden_state, dynamic batch and sequence
    (graph names from ``spec``)."""
    import torch

    kind = loaded.kind

    class _Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return encoder_output(self.model(input_ids=input_ids, attention_mask=attention_mask), kind)

    ids = torch.randint(0, loaded.config.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")  # optimum's names
    _export(_Encoder(loaded.model).eval(), (ids, mask),
            {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, path,
            input_names=spec["inputs"], output_names=spec["outputs"])
    _drop_shape_hints(path)


def _drop_shape_hints(path: Path) -> None:
    """Remove the graph's intermediate shape hints (``value_info``): for a classifier head the dynamo
    exporter writes one that contradicts onnx's own shape inference ((batch, 64) vs (batch, 3)), which
    onnxruntime.quantization then refuses. They are hints only; onnxruntime infers them again."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def _export(module, args, dynamic_shapes, path: Path, input_names, output_names) -> None:
    import torch

    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, optimize=True, verbose=False,
            )
    except Exception as e:
        raise ExportFailedError(
            f"torch.onnx.export failed: {condense(e, limit=400, typed=False)}",
            hint="the architecture may use an op or control flow torch.export cannot trace; "
            "try --format pte, or a transformers version that supports exporting it",
        ) from None
    size = sum(t.const_value.nbytes for t in program.model.graph.initializers.values() if t.const_value is not None)
    program.save(str(path), external_data=size >= _TWO_GB)


def onnx_spec(loaded, artifact: str, recipe: str) -> dict:
    """runtime.json of an ONNX build: the shared fields and the graph's tensor names (contract)."""
    if loaded.kind == "causal-lm":
        spec = causal_lm_spec(loaded, "onnx", artifact, recipe)
        return {**spec, **contract_fields("onnx", "causal-lm", spec["num_layers"])}
    return {**encoder_spec(loaded, "onnx", artifact, recipe), **contract_fields("onnx", loaded.kind)}


class OnnxFormat(Format):
    name = "onnx"
    description = "ONNX graph with KV cache for onnxruntime (dynamo exporter)"
    recipes = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight")

    def build(self, loaded, recipe: str, options: ExportOptions, out_dir: Path) -> Artifact:
        """Export fp32 with torch.onnx (dynamo), then apply ``recipe`` with onnxruntime's tools."""
        from exporter.formats import onnx_genai, onnx_quant

        self.check(loaded.kind, recipe, loaded.family)
        fp32_path = out_dir / (MODEL_FILE if recipe == "fp32" else FP32_FILE)
        spec = onnx_spec(loaded, MODEL_FILE, recipe)
        source = onnx_quant.source_plan(loaded, recipe, options.group_size)
        exported = loaded if source is None else with_source_grid(loaded, source)
        with task(options.progress, "export: ONNX graph (torch.onnx dynamo)"):
            if loaded.kind == "causal-lm":
                # int8 recipes quantize lm_head too (measured cost is small); int4 keeps it float, as
                # 4-bit lm_head cost SmolLM2 a further 0.12 of top-1 agreement.
                untie = recipe in ("int8-dynamic", "int8-static")
                with untied_output_layer(exported.model) if untie else contextlib.nullcontext():
                    export_causal_lm(exported, fp32_path, spec)
            else:
                export_encoder(exported, fp32_path, spec)
        del exported
        notes = []
        if source is not None:
            notes.append(source.note())
            spec["source_grid"] = source.as_dict()
        if recipe != "fp32":
            with task(options.progress, f"export: quantizing ONNX ({recipe}, onnxruntime.quantization)"):
                with quiet():  # onnxruntime's MatMulNBits quantizer logs every node at INFO (its import calls basicConfig)
                    notes += onnx_quant.apply(recipe, fp32_path, out_dir / MODEL_FILE, loaded, options, spec, source)
            for leftover in out_dir.glob(FP32_FILE + "*"):
                leftover.unlink()
        files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith("model"))
        files.remove(MODEL_FILE)
        if loaded.kind == "causal-lm":  # so onnxruntime_genai.Model(bundle) generates with it
            onnx_genai.write_genai_config(spec, loaded, options.max_context, out_dir)
        return Artifact("onnx", recipe, [MODEL_FILE, *files], spec, notes)


register(OnnxFormat())
