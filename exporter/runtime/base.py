"""The runner interface every format implements, and helpers built only on that interface."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import SPEC_MAX_BYTES, BundleFileError, bundle_path, load_manifest, read_json, verify_bundle
from .spec import contract_problem

RUNTIME_SPEC = "runtime.json"  # written by the exporter next to the artifact; read by the runners
REFERENCE_FILE = "parity_reference.npz"  # expected outputs shipped in the bundle (exporter.parity)
KINDS = ("causal-lm", "encoder", "sequence-classifier")


class RunnerError(BundleFileError):
    """The bundle cannot be run here (missing runtime package, bad bundle, context overflow)."""


def artifact_path(bundle_dir: Path, spec: dict) -> Path:
    """The artifact file runtime.json names, checked to be a plain file inside the bundle."""
    try:
        return bundle_path(bundle_dir, spec.get("artifact"), "artifact")
    except BundleFileError as e:
        raise RunnerError(str(e)) from None


class CausalLMRunner:
    """An exported causal LM with its KV cache: ``forward`` appends tokens and returns their logits.

    Calling ``forward`` with the whole prompt is the prefill; calling it with one token at a time is
    decoding. ``reset`` empties the cache.
    """

    format = ""
    runtime_name = ""
    runtime_version = ""
    # A static cache (pte, tflite) keeps every slot allocated; the causal mask hides slots at or
    # after ``position``, so going back is only moving the position.
    static_kv_cache = False

    def __init__(self, bundle_dir: Path, spec: dict):
        self.bundle_dir = Path(bundle_dir)
        self.spec = spec
        self.max_context: int | None = spec.get("max_context")
        self.position = 0

    def reset(self) -> None:
        """Forget every token seen so far."""
        raise NotImplementedError

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed ``token_ids`` after the cached ones; return float32 logits of shape (len, vocab)."""
        raise NotImplementedError

    def rewind(self, n: int) -> bool:
        """Keep only the first ``n`` cached tokens (a prompt edited after them, a regenerated reply).

        Returns False when this runner cannot, and the caller re-prefills. Runners with a static
        cache (pte, tflite) only move the position: slots past it are hidden by the causal mask and
        overwritten by the next tokens.
        """
        if n > self.position or n < 0:
            raise RunnerError(f"cannot rewind to {n}: {self.position} tokens are cached")
        if n == 0:
            self.reset()
            return True
        if n == self.position:
            return True
        return self._rewind(n)

    def _rewind(self, n: int) -> bool:
        if self.static_kv_cache:
            self.position = n  # the next tokens overwrite the stale slots
            return True
        return False

    def _check_room(self, n: int) -> None:
        if self.max_context is not None and self.position + n > self.max_context:
            raise RunnerError(
                f"{self.position + n} tokens exceed the exported context of {self.max_context}"
            )


class EncoderRunner:
    """An exported encoder: ``encode`` returns the last hidden states (len, hidden) of one sequence."""

    format = ""
    runtime_name = ""
    runtime_version = ""

    def __init__(self, bundle_dir: Path, spec: dict):
        self.bundle_dir = Path(bundle_dir)
        self.spec = spec

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError


def read_spec(bundle_dir: Path) -> dict:
    """The ``runtime.json`` of a bundle (format, artifact file, model kind and shapes), bounded and checked."""
    if not (Path(bundle_dir) / RUNTIME_SPEC).exists():
        raise RunnerError(f"{bundle_dir} has no {RUNTIME_SPEC}: not a slm-export bundle")
    try:
        spec = read_json(bundle_path(bundle_dir, RUNTIME_SPEC, RUNTIME_SPEC), SPEC_MAX_BYTES, RUNTIME_SPEC)
    except BundleFileError as e:
        raise RunnerError(str(e)) from None
    check_spec(spec, Path(bundle_dir) / RUNTIME_SPEC)
    return spec


def check_spec(spec: dict, where: object = RUNTIME_SPEC) -> None:
    """Refuse a runtime.json whose basic fields or tensor contract (``spec.py``) are missing or of the
    wrong type (one clear message)."""
    for key in ("format", "artifact"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise RunnerError(f"{where} has no {key!r} (a string): not a valid slm-export runtime.json")
    if not spec["format"].isidentifier():
        raise RunnerError(f"{where} names the format {spec['format']!r}, which is not a format name")
    if spec.get("kind", "causal-lm") not in KINDS:
        raise RunnerError(f"{where}: kind {spec.get('kind')!r} is not one of {', '.join(KINDS)}")
    problem = contract_problem(spec)
    if problem:
        raise RunnerError(f"{where}: {problem}")


def verify(bundle_dir: Path) -> dict:
    """Check the bundle against its manifest before anything is loaded; RunnerError on any difference.

    Returns the manifest it checked against."""
    try:
        manifest = load_manifest(bundle_dir)
        problems = verify_bundle(bundle_dir, manifest)
    except BundleFileError as e:
        raise RunnerError(f"{bundle_dir} cannot be verified: {e}") from None
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise RunnerError(f"{bundle_dir} does not match its manifest: {shown}")
    return manifest


def open_runner(bundle_dir: Path, spec: dict | None = None, verify_files: bool = True, **options):
    """Open the runner for the bundle's format (module ``<format>_runner`` of this package).

    With ``verify_files`` (the default) the bundle is first checked against its manifest (sha256 and
    size of every file, nothing undeclared), so a folder without manifest.json is refused; the
    exporter passes False only for the staging folder it has just written itself.
    """
    if verify_files:
        verify(bundle_dir)
    spec = spec or read_spec(bundle_dir)
    check_spec(spec)
    artifact_path(bundle_dir, spec)
    fmt = spec["format"]
    try:
        module = importlib.import_module(f"{__package__}.{fmt}_runner")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"{fmt}_runner"):
            raise RunnerError(f"no runner for format {fmt!r}") from None
        raise
    return module.open_runner(Path(bundle_dir), spec, **options)


def artifact_logits(runner: CausalLMRunner, ids: Sequence[int]) -> np.ndarray:
    """Runner logits for one window: prefill the first half, decode the rest one token at a time (so the
    comparison covers both the prefill graph and the KV-cache decode path)."""
    split = max(1, len(ids) // 2)
    runner.reset()
    parts = [runner.forward(list(ids[:split]))]
    parts += [runner.forward([t]) for t in ids[split:]]
    return np.concatenate(parts, axis=0)


def greedy_generate(runner: CausalLMRunner, prompt_ids: Sequence[int], max_new_tokens: int,
                    eos_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding with the runner's KV cache; stops after an EOS token or ``max_new_tokens``."""
    runner.reset()
    logits = runner.forward(list(prompt_ids))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if token in eos_ids or len(out) == max_new_tokens:
            break
        logits = runner.forward([token])
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's VmHWM first: ru_maxrss survives fork + exec, so a runner started from a big parent (the
    exporter holding PyTorch) would report the parent's peak instead of its own.
    """
    import resource
    import sys

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def measure_latency(runner: CausalLMRunner, prompt_ids: Sequence[int], decode_tokens: int = 64,
                    warmup: int = 1, repeats: int = 3, progress=None) -> dict:
    """TTFT, prefill and decode throughput and per-token latency percentiles, with warm-up.

    Each repeat resets the cache, prefills ``prompt_ids`` (TTFT = prefill + picking the first token)
    and decodes ``decode_tokens`` greedy tokens one at a time. Medians over repeats are reported;
    the per-token percentiles pool every decode step of every measured repeat.
    """
    prompt_ids = list(prompt_ids)
    if runner.max_context is not None:
        decode_tokens = max(1, min(decode_tokens, runner.max_context - len(prompt_ids) - 1))
    ttfts, prefill_rates, decode_rates, per_token = [], [], [], []
    for i in range(warmup + repeats):
        runner.reset()
        t0 = time.perf_counter()
        logits = runner.forward(prompt_ids)
        token = int(np.argmax(logits[-1]))
        t1 = time.perf_counter()
        steps = []
        for _ in range(decode_tokens):
            s0 = time.perf_counter()
            logits = runner.forward([token])
            token = int(np.argmax(logits[-1]))
            steps.append(time.perf_counter() - s0)
        if progress:
            progress(i + 1, warmup + repeats)
        if i < warmup:
            continue
        ttfts.append(t1 - t0)
        prefill_rates.append(len(prompt_ids) / (t1 - t0))
        decode_rates.append(len(steps) / sum(steps))
        per_token.extend(steps)
    ms = [s * 1000 for s in per_token]
    return {
        "prompt_tokens": len(prompt_ids),
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "ttft_ms": float(np.median(ttfts)) * 1000,
        "prefill_tok_s": float(np.median(prefill_rates)),
        "decode_tok_s": float(np.median(decode_rates)),
        "decode_tok_s_spread": [float(min(decode_rates)), float(max(decode_rates))],
        "per_token_ms": {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)},
        "per_token_ms_samples": [round(x, 4) for x in ms],
    }


def measure_encoder_latency(runner: EncoderRunner, token_ids: Sequence[int], warmup: int = 2,
                            repeats: int = 10) -> dict:
    """Latency of one encoder call on ``token_ids`` (median and percentiles)."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        runner.encode(list(token_ids))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "tokens": len(token_ids),
        "repeats": repeats,
        "encode_ms": float(np.median(times)),
        "per_call_ms": {"p50": percentile(times, 50), "p90": percentile(times, 90), "p99": percentile(times, 99)},
        "per_call_ms_samples": [round(x, 4) for x in times],
    }
