"""Runs an ONNX bundle with onnxruntime, keeping the KV cache between calls."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CausalLMRunner, EncoderRunner, RunnerError, artifact_path
from .messages import condense
from .spec import ENCODER_OUTPUT, contract, roles


def _session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise RunnerError("this bundle needs onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad model
        raise RunnerError(f"onnxruntime cannot load {path.name}: {condense(e, typed=False)}") from None
    return session, ort.__version__


class OnnxCausalLM(CausalLMRunner):
    format = "onnx"
    runtime_name = "onnxruntime"

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None):
        super().__init__(bundle_dir, spec)
        self.session, self.runtime_version = _session(artifact_path(self.bundle_dir, spec), threads)
        io = contract(spec)
        self.names = roles(spec)
        self.past_names = list(io["cache"]["inputs"])
        # Logits first, then the updated cache in the order of ``past_names``.
        self.output_names = [self.names["logits"], *io["cache"]["outputs"]]
        types = {i.name: i.type for i in self.session.get_inputs()}
        missing = [n for n in [*io["inputs"], *self.past_names] if n not in types]
        if missing:
            raise RunnerError(f"{spec['artifact']} lacks the inputs {missing[:3]} that runtime.json names")
        self.kv_dtype = np.float16 if "float16" in types[self.past_names[0]] else np.float32
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.spec["num_kv_heads"], 0, self.spec["head_dim"]), self.kv_dtype)
        self.past = [empty] * len(self.past_names)
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        n = len(token_ids)
        self._check_room(n)
        feed = {
            self.names["tokens"]: np.asarray([token_ids], np.int64),
            self.names["mask"]: np.ones((1, self.position + n), np.int64),
            self.names["positions"]: np.arange(self.position, self.position + n, dtype=np.int64)[None],
            **dict(zip(self.past_names, self.past)),
        }
        outputs = self.session.run(self.output_names, feed)
        self.past = outputs[1:]
        self.position += n
        return outputs[0][0].astype(np.float32, copy=False)

    def _rewind(self, n: int) -> bool:
        # The cache grows along the sequence axis (batch, heads, seq, head_dim): cut it.
        self.past = [p[:, :, :n] for p in self.past]
        self.position = n
        return True


class OnnxEncoder(EncoderRunner):
    format = "onnx"
    runtime_name = "onnxruntime"

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None):
        super().__init__(bundle_dir, spec)
        self.session, self.runtime_version = _session(artifact_path(self.bundle_dir, spec), threads)
        self.names = roles(spec)

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([token_ids], np.int64)
        feed = {self.names["tokens"]: ids, self.names["mask"]: np.ones_like(ids)}
        return self.session.run([self.names[ENCODER_OUTPUT[self.spec["kind"]]]], feed)[0][0]


def open_runner(bundle_dir: Path, spec: dict, threads: int | None = None, **_):
    """The ONNX runner for ``spec['kind']``."""
    cls = OnnxCausalLM if spec["kind"] == "causal-lm" else OnnxEncoder
    return cls(bundle_dir, spec, threads=threads)
