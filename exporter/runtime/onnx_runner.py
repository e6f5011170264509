"""Runs an ONNX bundle with onnxruntime, keeping the KV cache between calls."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CausalLMRunner, EncoderRunner, RunnerError, artifact_path


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
        raise RunnerError(f"onnxruntime cannot load {path.name}: {str(e).strip().splitlines()[0][:300]}") from None
    return session, ort.__version__


class OnnxCausalLM(CausalLMRunner):
    format = "onnx"
    runtime_name = "onnxruntime"

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None):
        super().__init__(bundle_dir, spec)
        self.session, self.runtime_version = _session(artifact_path(self.bundle_dir, spec), threads)
        self.n_layers = spec["num_layers"]
        past_input = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.kv_dtype = np.float16 if "float16" in past_input.type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.spec["num_kv_heads"], 0, self.spec["head_dim"]), self.kv_dtype)
        self.past = [empty] * (2 * self.n_layers)
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        n = len(token_ids)
        self._check_room(n)
        feed = {
            "input_ids": np.asarray([token_ids], np.int64),
            "attention_mask": np.ones((1, self.position + n), np.int64),
            "position_ids": np.arange(self.position, self.position + n, dtype=np.int64)[None],
        }
        for i in range(self.n_layers):
            feed[f"past_key_values.{i}.key"] = self.past[2 * i]
            feed[f"past_key_values.{i}.value"] = self.past[2 * i + 1]
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

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([token_ids], np.int64)
        return self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]


def open_runner(bundle_dir: Path, spec: dict, threads: int | None = None, **_):
    """The ONNX runner for ``spec['kind']``."""
    cls = OnnxCausalLM if spec["kind"] == "causal-lm" else OnnxEncoder
    return cls(bundle_dir, spec, threads=threads)
