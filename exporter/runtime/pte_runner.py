"""Run a ``.pte`` bundle with ExecuTorch's Python runtime (``executorch.runtime.Runtime``).

The program's ``forward(tokens [1, seq], input_pos [seq])`` keeps the KV cache in its mutable
buffers, so this runner only tracks the position: ``reset`` rewinds it to 0 (the causal mask hides
whatever a longer earlier sequence left in the cache beyond the current position). Prompts longer
than the program's ``max_seq_len`` are fed in chunks, as ExecuTorch's own LLM runner does.

ExecuTorch's Python runtime takes torch tensors (the ``executorch`` wheel depends on torch), so
torch is imported here, inside the runner, and only when a ``.pte`` bundle is opened.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CausalLMRunner, EncoderRunner, RunnerError, artifact_path
from .messages import condense
from .spec import contract

# The kernel libraries a program may ask for (runtime.json's ``custom_ops``), by module name. A bundle
# is untrusted input: it may only pick from ExecuTorch's own modules, never name code of its own.
KERNEL_LIBRARIES = (
    "executorch.extension.llm.custom_ops.custom_ops",  # llama::custom_sdpa, update_cache (LLM runner)
    "executorch.kernels.quantized",  # quantized_decomposed::* portable kernels
)


def _version() -> str:
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_method(path: Path, method: str, threads: int | None):
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise RunnerError(f"ExecuTorch's Python runtime is not installed ({e}): pip install executorch") from None
    if threads:
        _set_threads(int(threads))
    try:
        program = Runtime.get().load_program(path)
        return program, program.load_method(method)
    except Exception as e:  # the pybindings raise RuntimeError/ValueError for a bad program
        raise RunnerError(f"ExecuTorch cannot load {path.name}: {condense(e, typed=False)}") from None


def _set_threads(threads: int) -> None:
    # XNNPACK runs on ExecuTorch's global threadpool; the pybindings expose a reset for its size.
    try:
        from executorch.extension.pybindings import _C
    except ImportError:
        return
    reset = getattr(_C, "_unsafe_reset_threadpool", None)
    if reset is not None:
        reset(threads)


def _load_kernel_libraries(modules: Sequence[str], bundle_dir: Path) -> None:
    """Import the ExecuTorch kernel modules a program needs (e.g. llama::custom_sdpa) before loading it.

    Only names of ``KERNEL_LIBRARIES`` are accepted, and they are imported with the bundle's folder, its
    parent and the current folder off ``sys.path``, so no file a bundle brings can stand in for them.
    """
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise RunnerError(f"runtime.json's custom_ops must be a list of module names (got {modules!r})")
    refused = [m for m in modules if m not in KERNEL_LIBRARIES]
    if refused:
        raise RunnerError(f"the bundle asks to load {', '.join(map(repr, refused))} as kernel code; only "
                          f"ExecuTorch's own kernel libraries may be loaded ({', '.join(KERNEL_LIBRARIES)})")
    untrusted = {os.path.realpath(p) for p in (bundle_dir, Path(bundle_dir).parent, os.getcwd())}
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if p and os.path.realpath(p) not in untrusted]
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as e:
                raise RunnerError(f"the program needs kernels from {name}, which does not load here: {e}") from None
    finally:
        sys.path[:] = saved


def _open_program(runner, threads: int | None) -> None:
    """Load the bundle's program into ``runner`` (both runner kinds need the same set-up)."""
    import torch

    runner._torch = torch
    _load_kernel_libraries(runner.spec.get("custom_ops") or [], runner.bundle_dir)
    runner.runtime_version = _version()
    # The method takes the contract's inputs positionally (tokens, input_pos / input_ids).
    method = contract(runner.spec)["method"]
    runner._program, runner._method = _load_method(artifact_path(runner.bundle_dir, runner.spec), method, threads)


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
