"""LiteRT-LM: the ``model.litertlm`` a tflite causal-LM bundle carries for LiteRT's own LLM runtime.

A ``.litertlm`` file (built with litert-lm-builder) is a header plus sections: LlmMetadata (start and
stop tokens, the chat template, the context), ExecutorMetadata (the cache tensors as state buffers with
their sequence axis), the HF tokenizer (``tokenizer.json``, zlib) and a TFLite section of model type
``prefill_decode``. litert-torch's own generative export (``export_hf``: ``core/litert_lm_builder.py``
``package_model`` / ``build_llm_metadata``, ``model_ext/metadata_builder.py``) packs exactly these.

The TFLite section is the bundle's ``model.tflite`` as it is: LiteRT-LM's CPU executor
(``runtime/executor/litert_compiled_model_executor_utils.cc`` and ``llm_litert_compiled_model_executor.cc``
of google-ai-edge/LiteRT-LM) finds

  * signatures whose names start with ``prefill`` (their length from ``input_pos``) and one ``decode``;
  * inputs ``tokens`` (1, N) int32 and ``input_pos`` (N,) int32, output ``logits``: its "PyTorch CPU
    only" signature, the one without a ``mask`` input (our graphs build the mask from ``input_pos``);
  * the KV cache by the prefix ``kv_cache_k_`` / ``kv_cache_v_``, each signature returning the whole
    updated cache under its input's name (the executor swaps input and output buffers after a call).

Our tflite export names its tensors that way (``exporter/runtime/spec.py``), so one flatbuffer serves
both runners; the weights are stored twice in the bundle (model.tflite and inside model.litertlm),
which the artifact notes say with sizes. Litert-torch's export writes the V cache transposed
(``v_ts_idx=3``); ours is (1, kv, slot, head_dim) for K and V, and the ExecutorMetadata says so.

Measured (2026-12-02, litert-lm-api 0.18.1, CPU): tiny fp32 models give our runner's greedy tokens
exactly; on SmolLM2-135M (fp32 and int8-dynamic) LiteRT-LM's greedy tokens equal ours while the model is
confident (the chat prompt's "The capital of France is Paris." up to <|im_end|>) but part from ours,
PyTorch's (fp32, fp16 and bf16) and LiteRT's own CompiledModel on the same flatbuffer within a few tokens
of plain text (0 of 10 eval sentences identical over 16 tokens). Not the cause (each tried): the sampler
(top_k 1; seeds, top_p, temperature), the activation type, LiteRT-LM's prefill sequence (zero-padded
positions, last prompt token held back for decode), in-place cache buffers, this ExecutorMetadata.
Gemma-3-270M int8-dynamic agrees far better: 64 plain-text tokens identical, and where the eval
sentences part (8 of 10 within 16 tokens) our logits have near-ties there (margins 0.03-0.2).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from exporter.errors import ExportFailedError, condense
from exporter.quiet import quiet

LITERTLM_FILE = "model.litertlm"
# litert-torch's mapping of transformers model types to LiteRT-LM's LlmModelType (the rest: generic).
_MODEL_TYPES = {"gemma3": "gemma3", "gemma3_text": "gemma3", "qwen3": "qwen3", "qwen2": "qwen2p5"}


def builder_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("litert-lm-builder")
    except PackageNotFoundError:
        return None


def prepends_bos(tokenizer, chat_template: str | None) -> bool:
    """Does the model's input start with BOS (plain tokenization or the rendered chat template)?

    litert-torch's rule (``_tokenizer_prepends_bos``): a declared BOS the tokenizer never puts in front
    must not become LiteRT-LM's ``start_token``, or the runtime feeds a token the model never saw there.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x").input_ids
    if ids and ids[0] == bos:
        return True
    if chat_template:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=False)
        except Exception:  # a template that does not render for this message: no evidence of a BOS
            return False
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return bool(ids) and ids[0] == bos
    return False


def llm_metadata(loaded, spec: dict):
    """The LlmMetadata proto of a bundle: start / stop tokens, chat template, context, model type."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) and template.strip() else None
    meta = llm_metadata_pb2.LlmMetadata()
    if prepends_bos(tokenizer, template):
        meta.start_token.token_ids.ids.append(int(tokenizer.bos_token_id))
    for eos in spec.get("eos_token_ids") or []:
        meta.stop_tokens.add().token_ids.ids.append(int(eos))
    if tokenizer.pad_token_id is not None:
        meta.pad_token.token_ids.ids.append(int(tokenizer.pad_token_id))
    if template:
        meta.jinja_prompt_template = template
    meta.max_num_tokens = int(spec["max_context"])
    kind = _MODEL_TYPES.get(spec.get("model_type"), "generic_model")
    message = {"gemma3": llm_model_type_pb2.Gemma3, "qwen3": llm_model_type_pb2.Qwen3,
               "qwen2p5": llm_model_type_pb2.Qwen2p5}.get(kind, llm_model_type_pb2.GenericModel)
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(**{kind: message()}))
    meta.supports_thinking = False
    meta.supports_function_calling = False
    return meta


def executor_metadata(spec: dict):
    """ExecutorMetadata: each layer's cache tensors as LiteRT-LM state buffers, with their sequence axis.

    litert-torch writes it for every model (``model_ext/metadata_builder.py`` ``build_executor_metadata``),
    with its layout: K (1, kv, seq, d) at axis 2, V transposed (1, kv, d, seq) at axis 3. Ours keeps V as
    (1, kv, seq, d), so both are axis 2 here; sliding-window layers are declared global, as litert-torch
    does without a ring buffer (our graph masks the window itself over the full cache).
    """
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as pb

    meta = pb.ExecutorMetadata()
    llm = meta.llm_executor_metadata
    axis = spec["cache"]["layout"].index("seq")
    for name in spec["cache"]["inputs"]:
        buffer = llm.state_buffers.add()
        buffer.prefill_input_name = buffer.prefill_output_name = name
        buffer.decode_input_name = buffer.decode_output_name = name
        buffer.policy = pb.StateBuffer.POLICY_DEFAULT
        key = name.startswith("kv_cache_k_")
        buffer.type = pb.StateBuffer.TYPE_GLOBAL_KEY_CACHE if key else pb.StateBuffer.TYPE_GLOBAL_VALUE_CACHE
        buffer.sequence_axis = axis
        buffer.maximum_sequence_length = int(spec["max_context"])
    return meta


def build(loaded, spec: dict, tflite_path: Path, out_path: Path) -> list[str]:
    """Write ``out_path`` (.litertlm) from the converted ``tflite_path``; return the notes."""
    import litert_lm_builder as llb

    tokenizer_json = Path(loaded.folder) / "tokenizer.json"
    if not tokenizer_json.is_file():
        return [f"no {LITERTLM_FILE}: LiteRT-LM needs the HF tokenizer.json, which this model folder lacks"]
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="litertlm-") as tmp:
            meta_path = Path(tmp) / "llm_metadata.pb"
            meta_path.write_bytes(llm_metadata(loaded, spec).SerializeToString())
            builder = llb.LitertLmFileBuilder()
            builder.add_system_metadata(llb.Metadata(key="Authors", value="slm-export", dtype=llb.DType.STRING))
            builder.add_llm_metadata(str(meta_path))
            executor_path = Path(tmp) / "executor_metadata.pb"
            executor_path.write_bytes(executor_metadata(spec).SerializeToString())
            builder.add_executor_metadata(str(executor_path))
            builder.add_hf_tokenizer(str(tokenizer_json))
            # float32 activations: what the parity gate measured (LiteRT-LM's CPU default for a text
            # decoder is fp16).
            with quiet():  # the builder prints "Adding prefer_activation_type"
                builder.add_tflite_model(str(tflite_path), llb.TfLiteModelType.PREFILL_DECODE,
                                         prefer_activation_type="fp32")
            with open(out_path, "wb") as f:
                builder.build(f, validate_metadata=True)
    except Exception as e:  # the builder raises ValueError / FileNotFoundError / flatbuffer errors
        raise ExportFailedError(f"litert-lm-builder could not pack {LITERTLM_FILE}: {condense(e, limit=300)}",
                                hint="pip install litert-lm-builder==0.18.1") from None
    seconds = time.perf_counter() - t0
    size, tflite = out_path.stat().st_size, tflite_path.stat().st_size
    return [f"{LITERTLM_FILE} for LiteRT-LM ({size / 2**20:.1f} MB, packed in {seconds:.1f} s): metadata, "
            f"tokenizer and model.tflite as its prefill/decode section, so the bundle holds the weights twice "
            f"({tflite / 2**20:.1f} MB in model.tflite and again in {LITERTLM_FILE})"]
