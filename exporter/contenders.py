"""Host-only benchmark contenders that are not our runners: PyTorch eager, optimum-onnx's export,
onnxruntime-genai's generation loop over an ONNX bundle (its genai_config.json), and llama.cpp on the
GGUF the model came from and its requantizations.

Both implement the device-side ``CausalLMRunner`` interface, so ``exporter.runtime.bench_worker``
measures them with exactly the loop that measures the bundles. Imports are lazy: the optimum
contender runs in its own virtual environment (optimum-onnx pins an older transformers, see
TOOLCHAIN.md), where only numpy, onnxruntime and optimum exist besides this file's package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from exporter.runtime.base import CausalLMRunner


class EagerRunner(CausalLMRunner):
    """PyTorch eager fp32 with transformers' DynamicCache: each call is one step of HF ``generate``."""

    format = "pytorch"
    runtime_name = "torch eager"

    def __init__(self, model_spec: str, threads: int | None = None):
        import torch

        from exporter.loading import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self.loaded = load_model(model_spec or None)
        super().__init__(Path(self.loaded.folder or "."), {"max_context": None})
        self.runtime_version = torch.__version__
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.loaded.model.config)
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.loaded.model(input_ids=torch.tensor([list(token_ids)]), past_key_values=self.cache,
                                    use_cache=True)
        self.cache = out.past_key_values
        self.position += len(token_ids)
        return out.logits[0].float().numpy()


class OptimumRunner(CausalLMRunner):
    """optimum-onnx's ``ORTModelForCausalLM`` on a folder made by ``optimum-cli export onnx
    --task text-generation-with-past``, used the way its documentation shows (default options)."""

    format = "onnx (optimum)"
    runtime_name = "onnxruntime via optimum"

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self._torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, session_options=options)
        super().__init__(Path(folder), {"max_context": None})
        self.runtime_version = onnxruntime.__version__
        self.reset()

    def reset(self) -> None:
        self.past = None
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([list(token_ids)])
        mask = torch.ones((1, self.position + len(token_ids)), dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.position += len(token_ids)
        return np.asarray(out.logits[0], dtype=np.float32)


class GenaiRunner(CausalLMRunner):
    """onnxruntime-genai's ``Generator`` over an ONNX bundle: ``append_tokens`` is the step, its
    ``logits`` output the step's logits (so the same latency loop and parity windows measure it)."""

    format = "onnx (onnxruntime-genai)"
    runtime_name = "onnxruntime-genai"

    def __init__(self, bundle: Path, threads: int | None = None):
        import json

        import onnxruntime_genai as og

        config = og.Config(str(bundle))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
        self._og = og
        self.model = og.Model(config)
        from exporter.formats.onnx_genai import GENAI_CONFIG

        spec = json.loads((Path(bundle) / GENAI_CONFIG).read_text())
        super().__init__(Path(bundle), {"max_context": spec["search"]["max_length"]})
        self.runtime_version = getattr(og, "__version__", "")
        self.reset()

    def reset(self) -> None:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_context, do_sample=False)
        self.generator = self._og.Generator(self.model, params)
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        self.generator.append_tokens(list(token_ids))
        self.position += len(token_ids)
        return np.asarray(self.generator.get_output("logits"), dtype=np.float32)[0]


class LlamaCppRunner(CausalLMRunner):
    """llama.cpp (through llama-cpp-python, in its own environment) on a GGUF file: ``eval`` is the
    step, ``scores`` its logits. ``logits_all`` makes the prefill compute every position's logits,
    as our runners' graphs do, so prefill figures compare like with like."""

    format = "gguf"
    runtime_name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int | None = None, n_ctx: int = 1024):
        import os

        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                                   n_threads=int(threads or os.cpu_count() or 2))
        super().__init__(Path(gguf).parent, {"max_context": n_ctx})
        self.runtime_version = f"llama-cpp-python {llama_cpp.__version__}"
        self.reset()

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the cache from position 0 on
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        self.llm.eval(list(token_ids))
        self.position = self.llm.n_tokens
        return np.array(self.llm.scores[self.position - len(token_ids): self.position], dtype=np.float32)


def open_contender(kind: str, path: Path, threads: int | None):
    """Build the ``kind`` contender (``eager``: a model spec as ``--model`` takes; ``optimum``: a folder)."""
    if kind == "eager":
        return EagerRunner(str(path) if str(path) not in ("", "default") else "", threads)
    if kind == "optimum":
        return OptimumRunner(Path(path), threads)
    if kind == "genai":
        return GenaiRunner(Path(path), threads)
    if kind == "llama_cpp":
        return LlamaCppRunner(Path(path), threads)
    raise ValueError(f"unknown contender kind {kind!r}")
