"""Run a ``.pte`` bundle with ExecuTorch's Python runtime (``executorch.runtime.Runtime``).

The program's ``forward(tokens [1, seq], input_pos [seq])`` keeps the KV cache in its mutable
buffers, so this runner only tracks the position: ``reset`` rewinds it to 0 (the causal mask hides
whatever a longer earlier sequence left in the cache beyond the current position). Prompts longer
than the program's ``max_seq_len`` are fed in chunks, as ExecuTorch's own LLM runner does.

ExecuTorch's Python runtime takes torch tensors (the ``executorch`` wheel depends on torch), so
torch is imported here, inside the runner, and only when a ``.pte`` bundle is opened.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CausalLMRunner, EncoderRunner, RunnerError


def _version() -> str:
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_method(path: Path, threads: int | None):
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise RunnerError(f"ExecuTorch's Python runtime is not installed ({e}): pip install executorch") from None
    if not path.exists():
        raise RunnerError(f"{path} is missing from the bundle")
    if threads:
        _set_threads(int(threads))
    try:
        program = Runtime.get().load_program(path)
        return program, program.load_method("forward")
    except Exception as e:  # the pybindings raise RuntimeError/ValueError for a bad program
        raise RunnerError(f"ExecuTorch cannot load {path.name}: {str(e).strip().splitlines()[0][:300]}") from None


def _set_threads(threads: int) -> None:
    # XNNPACK runs on ExecuTorch's global threadpool; the pybindings expose a reset for its size.
    try:
        from executorch.extension.pybindings import _C
    except ImportError:
        return
    reset = getattr(_C, "_unsafe_reset_threadpool", None)
    if reset is not None:
        reset(threads)


def _load_kernel_libraries(modules: Sequence[str]) -> None:
    # Programs that call ExecuTorch's LLM kernels (llama::custom_sdpa) need them registered before
    # loading; the module that registers them ships in the executorch wheel.
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise RunnerError(f"the program needs kernels from {name}, which does not load here: {e}") from None


def _open_program(runner, threads: int | None) -> None:
    """Load the bundle's program into ``runner`` (both runner kinds need the same set-up)."""
    import torch

    runner._torch = torch
    _load_kernel_libraries(runner.spec.get("custom_ops") or [])
    runner.runtime_version = _version()
    runner._program, runner._method = _load_method(runner.bundle_dir / runner.spec["artifact"], threads)


class PteCausalLMRunner(CausalLMRunner):
    """A causal LM ``.pte``: ``forward`` appends tokens to the program's static KV cache."""

    format = "pte"
    runtime_name = "executorch"
    static_kv_cache = True

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None):
        super().__init__(bundle_dir, spec)
        _open_program(self, threads)
        self.max_seq_len = int(spec.get("max_seq_len") or (self.max_context or 2) - 1)
        self.threads = threads

    def reset(self) -> None:
        self.position = 0

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise RunnerError("forward needs at least one token")
        self._check_room(len(ids))
        torch = self._torch
        out = []
        for start in range(0, len(ids), self.max_seq_len):
            chunk = ids[start:start + self.max_seq_len]
            tokens = torch.tensor([chunk], dtype=torch.long)
            pos = torch.arange(self.position, self.position + len(chunk), dtype=torch.long)
            logits = self._method.execute([tokens, pos])[0]
            # Copy out at once: the output lives in the method's planned memory, reused next call.
            out.append(logits[0].to(torch.float32).numpy().copy())
            self.position += len(chunk)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def constant(self, name: str):
        """A constant method of the program (e.g. ``get_max_seq_len``), or None if absent.

        A method returning several values (``get_eos_ids``) comes back as a list, one value as itself.
        """
        if name not in self._program.method_names:
            return None
        value = list(self._program.load_method(name).execute([]))
        return value[0] if len(value) == 1 and not name.endswith("_ids") else value


class PteEncoderRunner(EncoderRunner):
    """An encoder ``.pte``: ``encode(ids)`` returns the last hidden states (len, hidden)."""

    format = "pte"
    runtime_name = "executorch"

    def __init__(self, bundle_dir: Path, spec: dict, threads: int | None = None):
        super().__init__(bundle_dir, spec)
        _open_program(self, threads)
        self.max_context = spec.get("max_context")

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise RunnerError("encode needs at least one token")
        if self.max_context is not None and len(ids) > self.max_context:
            raise RunnerError(f"{len(ids)} tokens exceed the exported length of {self.max_context}")
        hidden = self._method.execute([self._torch.tensor([ids], dtype=self._torch.long)])[0]
        return hidden[0].to(self._torch.float32).numpy().copy()


def open_runner(bundle_dir: Path, spec: dict, threads: int | None = None, **opts):
    """The runner for a ``.pte`` bundle (called by ``exporter.runtime.base.open_runner``)."""
    cls = PteCausalLMRunner if spec.get("kind", "causal-lm") == "causal-lm" else PteEncoderRunner
    return cls(bundle_dir, spec, threads=threads)
