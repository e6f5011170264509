"""Runner for .tflite bundles: ai-edge-litert's interpreter, or tflite-runtime where only that exists.

A causal LM bundle has ``prefill_<N>`` signatures and a one-token ``decode`` signature sharing one
set of weights; the KV cache is an explicit input and output of every signature (see
``exporter/formats/tflite.py``). The runner keeps the cache arrays between calls and picks, for each
chunk of new tokens, the smallest prefill signature that holds it (padding the rest), so a prompt
longer than the largest prefill length is prefilled in several calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CausalLMRunner, EncoderRunner, RunnerError, artifact_path
from .messages import condense
from .spec import ENCODER_KINDS, ENCODER_OUTPUT, contract, decode_signature, roles

RUNTIMES = ("ai-edge-litert", "tflite-runtime")


def load_interpreter_class(prefer: str | None = None):
    """(Interpreter class, runtime name, version): ai-edge-litert first, then tflite-runtime."""
    order = [prefer] if prefer else list(RUNTIMES)
    for name in order:
        try:
            if name == "ai-edge-litert":
                from ai_edge_litert import interpreter as module
            elif name == "tflite-runtime":
                from tflite_runtime import interpreter as module
            else:
                raise RunnerError(f"unknown TFLite runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
        except ImportError:
            continue
        return module.Interpreter, name, _version(name)
    raise RunnerError(
        f"no TFLite runtime found (tried {', '.join(order)}); pip install ai-edge-litert "
        "(or tflite-runtime where ai-edge-litert has no wheel)",
    ) from None


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # metadata missing (vendored install): the version is informative only
        return "unknown"


def dequantize(array: np.ndarray, details: dict) -> np.ndarray:
    """float32 values of a tensor; integer tensors with quantization parameters are dequantized."""
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), np.float32)
    if scales.size == 0:
        scale, zero = details.get("quantization", (0.0, 0))
        if not scale:
            return array.astype(np.float32)
        scales, zeros = np.float32(scale), np.float32(zero)
    else:
        zeros = np.asarray(params.get("zero_points", np.zeros_like(scales)), np.float32)
        axis = params.get("quantized_dimension", 0)
        if scales.size > 1:  # per-axis: broadcast along the quantized dimension
            shape = [1] * array.ndim
            shape[axis] = scales.size
            scales, zeros = scales.reshape(shape), zeros.reshape(shape)
    return (array.astype(np.float32) - zeros) * scales


def quantize(values: np.ndarray, details: dict) -> np.ndarray:
    """``values`` in the input tensor's dtype (quantized with its parameters when it is an integer tensor)."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f" or values.dtype == dtype:
        return values.astype(dtype, copy=False)
    scale, zero = details.get("quantization", (0.0, 0))
    if not scale:
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero, info.min, info.max).astype(dtype)


class _Base:
    def _open(self, bundle_dir: Path, spec: dict, threads: int | None, runtime: str | None):
        interpreter_class, self.runtime_name, self.runtime_version = load_interpreter_class(runtime)
        path = artifact_path(bundle_dir, spec)
        try:
            self.interpreter = interpreter_class(model_path=str(path), num_threads=threads)
        except (ValueError, RuntimeError) as e:
            raise RunnerError(f"{self.runtime_name} cannot load {path.name}: {condense(e, typed=False)}") from None
        return self.interpreter.get_signature_list()

    def _signatures(self, spec: dict, available) -> dict[str, int]:
        """{signature: tokens per call} of the contract, each checked to be in the flatbuffer."""
        signatures = contract(spec)["signatures"]
        missing = [name for name in signatures if name not in available]
        if missing:
            raise RunnerError(f"{spec['artifact']} lacks signatures {missing}; it has {sorted(available)}")
        return {name: int(n) for name, n in signatures.items()}


class TFLiteCausalLM(_Base, CausalLMRunner):
    """Prefill/decode over the bundle's signatures with the KV cache kept here as numpy arrays.

    Two ways to move the cache in and out of the interpreter, with identical results:
      * direct (default): the cache lives in each signature's own input buffers; after a call only
        the slots that call wrote are copied (output -> our arrays -> that signature's inputs), and a
        signature whose inputs are stale gets one full copy when it is next used. This avoids copying
        the whole cache twice per decoded token (~47 MB a step for SmolLM2 at 512 slots).
      * plain (``direct=False``, or a runtime lacking the interpreter's tensor views): the public
        SignatureRunner call, which copies every cache tensor in and out on each call.
    """

    format = "tflite"
    static_kv_cache = True
    SLOT_AXIS = 2  # cache tensors are (batch, kv_heads, slot, head_dim)

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None, runtime: str | None = None,
                 direct: bool = True):
        CausalLMRunner.__init__(self, bundle_dir, spec)
        self.lengths = self._signatures(spec, self._open(bundle_dir, spec, threads, runtime))
        self.decode = decode_signature(self.lengths)
        if self.decode is None:
            raise RunnerError(f"{spec['artifact']}: runtime.json names no one-token (decode) signature")
        self.runners = {name: self.interpreter.get_signature_runner(name) for name in self.lengths}
        self.in_details = {name: r.get_input_details() for name, r in self.runners.items()}
        self.out_details = {name: r.get_output_details() for name, r in self.runners.items()}
        # Each signature returns the updated cache under its input's name (the contract's cache inputs).
        self.cache_names = list(contract(spec)["cache"]["inputs"])
        names = roles(spec)
        self.tokens_name, self.pos_name, self.logits_name = names["tokens"], names["positions"], names["logits"]
        self.pad = int(spec.get("pad_token_id", 0))
        decode_inputs = self.in_details[self.decode]
        self.cache = {n: np.zeros(decode_inputs[n]["shape"], np.dtype(decode_inputs[n]["dtype"]))
                      for n in self.cache_names}
        if self.max_context is None:
            self.max_context = int(decode_inputs[self.cache_names[0]]["shape"][self.SLOT_AXIS])
        self.direct = direct and self._setup_direct()
        self.reset()

    def _setup_direct(self) -> bool:
        """Allocate every signature once and check the interpreter offers per-subgraph tensor views."""
        wrapper = getattr(self.interpreter, "_interpreter", None)
        if wrapper is None or not all(hasattr(r, "_subgraph_index") for r in self.runners.values()):
            return False
        try:
            for name, runner in self.runners.items():
                wrapper.AllocateTensors(runner._subgraph_index)
                view = wrapper.tensor(wrapper, runner._inputs[self.cache_names[0]], runner._subgraph_index)
                if view.shape != self.cache[self.cache_names[0]].shape:
                    return False
                del view
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return False
        self._wrapper = wrapper
        self._synced = {name: False for name in self.runners}
        return True

    def reset(self) -> None:
        """Forget every token seen so far (stale slots need no clearing: the mask hides them)."""
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed ``token_ids`` after the cached ones; float32 logits (len, vocab)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            return np.zeros((0, int(self.spec["vocab_size"])), np.float32)
        self._check_room(len(ids))
        chunks = []
        done = 0
        while done < len(ids):
            name = self._pick(len(ids) - done)
            take = min(self.lengths[name], len(ids) - done)
            chunk = ids[done:done + take]
            try:
                logits = self._run_direct(name, chunk) if self.direct else self._run_plain(name, chunk)
            except (ValueError, RuntimeError) as e:
                raise RunnerError(
                    f"{self.runtime_name} failed running signature {name}: {condense(e, typed=False)}") from None
            if self.runtime_name == "tflite-runtime" and not logits.any():
                # tflite-runtime 2.14 silently returns zeros for dynamic-range int8 models.
                raise RunnerError(f"tflite-runtime {self.runtime_version} returned all-zero logits for this "
                                  f"{self.spec.get('recipe')} model; install ai-edge-litert to run it")
            chunks.append(logits)
            self.position += take
            done += take
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _pick(self, remaining: int) -> str:
        """The signature for the next chunk: the smallest prefill that holds ``remaining`` tokens, else the
        largest prefill (chunked prefill), else decode. A prefill writes all of its N cache slots, so it
        is used only where N slots remain before ``max_context`` (the cache update clamps, never wraps)."""
        room = self.max_context - self.position
        fits = sorted((n, name) for name, n in self.lengths.items() if name != self.decode and n <= room)
        if remaining == 1 or not fits:
            return self.decode
        holding = [name for n, name in fits if n >= remaining]
        return holding[0] if holding else fits[-1][1]

    def _small_inputs(self, name: str, ids: list[int]) -> dict:
        length = self.lengths[name]
        tokens = np.full((1, length), self.pad, np.int32)
        tokens[0, :len(ids)] = ids
        return {self.tokens_name: tokens,
                self.pos_name: np.arange(self.position, self.position + length, dtype=np.int32)}

    def _run_plain(self, name: str, ids: list[int]) -> np.ndarray:
        feed = self._small_inputs(name, ids)
        feed.update(self.cache)
        out = self.runners[name](**feed)
        for n in self.cache_names:
            self.cache[n] = self._as_input(out[n], name, n)
        return dequantize(out[self.logits_name], self.out_details[name][self.logits_name])[0, :len(ids)]

    def _run_direct(self, name: str, ids: list[int]) -> np.ndarray:
        runner, w = self.runners[name], self._wrapper
        sub = runner._subgraph_index
        outputs = dict(runner._outputs)
        if not self._synced[name]:  # another signature ran since: this one's cache inputs are stale
            for n in self.cache_names:
                view = w.tensor(w, runner._inputs[n], sub)
                view[...] = self.cache[n]
                del view
        for n, value in self._small_inputs(name, ids).items():
            w.SetTensor(runner._inputs[n], value, sub)
        w.Invoke(sub)
        # Only the slots of the real tokens changed (padding slots are garbage the mask hides and the
        # next tokens overwrite): copy those into our arrays and back into this signature's inputs.
        slots = (slice(None),) * self.SLOT_AXIS + (slice(self.position, self.position + len(ids)),)
        for n in self.cache_names:
            out_view = w.tensor(w, outputs[n], sub)
            self.cache[n][slots] = self._as_input(out_view[slots], name, n)
            del out_view
            in_view = w.tensor(w, runner._inputs[n], sub)
            in_view[slots] = self.cache[n][slots]
            del in_view
        for other in self._synced:
            self._synced[other] = other == name
        view = w.tensor(w, outputs[self.logits_name], sub)
        logits = np.array(view[0, :len(ids)])
        del view
        return dequantize(logits, self.out_details[name][self.logits_name])

    def _as_input(self, value: np.ndarray, name: str, n: str) -> np.ndarray:
        """A cache output in the dtype its input takes (they differ only if quantized differently)."""
        want = self.in_details[name][n]
        if value.dtype == np.dtype(want["dtype"]):
            return value
        return quantize(dequantize(value, self.out_details[name][n]), want)


class TFLiteEncoder(_Base, EncoderRunner):
    """``encode_<N>`` signatures: ids padded to the smallest length that holds them, with an attention mask.

    (Bundles written before there were several lengths have one signature named in ``spec["signature"]``;
    ``spec.contract`` reads it.)
    """

    format = "tflite"

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None, runtime: str | None = None):
        EncoderRunner.__init__(self, bundle_dir, spec)
        signatures = self._signatures(spec, self._open(bundle_dir, spec, threads, runtime))
        self.names = roles(spec)
        self.runners = {}
        for name in signatures:
            runner = self.interpreter.get_signature_runner(name)
            # The length the flatbuffer really takes (an old bundle's spec may not say it).
            length = int(runner.get_input_details()[self.names["tokens"]]["shape"][1])
            self.runners[length] = (runner, runner.get_output_details())
        self.length = max(self.runners)
        self.pad = int(spec.get("pad_token_id", 0))

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        """Last hidden states (len, hidden) of one sequence of at most the exported length (a
        classifier: its label logits)."""
        ids = [int(t) for t in token_ids]
        if len(ids) > self.length:
            raise RunnerError(f"{len(ids)} tokens exceed the exported encoder length of {self.length}")
        length = min(n for n in self.runners if n >= len(ids))
        runner, out_details = self.runners[length]
        tokens = np.full((1, length), self.pad, np.int32)
        mask = np.zeros((1, length), np.int32)
        tokens[0, :len(ids)] = ids
        mask[0, :len(ids)] = 1
        out = runner(**{self.names["tokens"]: tokens, self.names["mask"]: mask})
        name = self.names[ENCODER_OUTPUT[self.spec["kind"]]]
        values = dequantize(out[name], out_details[name])[0]
        return values if self.spec["kind"] != "encoder" else values[:len(ids)]  # drop the padding positions


def open_runner(bundle_dir: Path, spec: dict, threads: int | None = None, **opts):
    """The runner for a tflite bundle. Options: ``runtime`` forces "ai-edge-litert" or "tflite-runtime";
    ``direct=False`` uses the plain SignatureRunner calls (see ``TFLiteCausalLM``)."""
    if spec.get("kind") in ENCODER_KINDS:
        return TFLiteEncoder(bundle_dir, spec, threads=threads, runtime=opts.get("runtime"))
    return TFLiteCausalLM(bundle_dir, spec, threads=threads, runtime=opts.get("runtime"),
                          direct=opts.get("direct", True))
