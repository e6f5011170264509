"""NVIDIA Jetson Orin (Nano / NX / AGX, JetPack 6) over ssh: ONNX fp16 on ONNX Runtime's TensorRT / CUDA EPs.

The default recipe is fp16 (TensorRT builds fp16 engines, the GPU's native fast path); int8-static
(QDQ, calibrated) is the alternative TensorRT runs as explicit-quantization int8. The device farm
runs the bundle with the execution providers below (the available ones, in order), checks which
providers onnxruntime really used, and also times the ``.onnx`` with ``trtexec`` when the device has
it (JetPack installs it at /usr/src/tensorrt/bin/trtexec).

On the device, onnxruntime must be the GPU build for JetPack (``onnxruntime-gpu`` from the Jetson AI
Lab / Jetson Zoo wheel index); PyPI's plain ``onnxruntime`` is CPU-only and fails the providers check.
"""

from __future__ import annotations

import re

from targets import Budgets, DeviceProfile, Target, Trtexec, register

# ---- what the device farm does differently on this target (its DeviceProfile, below) ----

# Execution providers in priority order; onnxruntime assigns each node to the first that takes it.
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# The providers a run must really have used (else the GPU build of onnxruntime is missing).
REQUIRED_PROVIDERS = ("CUDAExecutionProvider",)
RUNTIME_PIP_HINT = ("install JetPack's GPU build of onnxruntime on the device: "
                    "pip install onnxruntime-gpu from NVIDIA's Jetson wheel index for your JetPack "
                    "(match your JetPack / CUDA version; PyPI's onnxruntime is CPU-only)")
TRTEXEC = ("trtexec", "/usr/src/tensorrt/bin/trtexec")
TRT_CACHE_DIR = "trt_cache"  # beside the deployed bundle: TensorRT engines are built once per shape profile
PROFILE_MAX_CONTEXT = 512  # the decode profile's longest KV cache when the bundle has no max_context


def _profile_len(spec: dict) -> int:
    return int(spec.get("max_context") or PROFILE_MAX_CONTEXT)


def shape_profile(spec: dict, past: int, new: int) -> str:
    """A TensorRT shape string ``name:dims,...`` for one call with ``past`` cached and ``new`` tokens,
    with the tensor names of the bundle's runtime.json (its contract, exporter/runtime/spec.py)."""
    from exporter.runtime.spec import contract, roles

    spec = {"format": "onnx", **spec}  # this target runs ONNX bundles only
    names = roles(spec)
    parts = [f"{names['tokens']}:1x{new}", f"{names['mask']}:1x{past + new}", f"{names['positions']}:1x{new}"]
    kv = f"1x{spec['num_kv_heads']}x{past}x{spec['head_dim']}"
    parts += [f"{name}:{kv}" for name in contract(spec)["cache"]["inputs"]]
    return ",".join(parts)


def provider_options(spec: dict, cache_dir: str) -> dict:
    """Per-provider options: fp16/int8 engines, an engine cache, and one shape profile covering
    prefill and decode (without explicit profiles TensorRT rebuilds an engine whenever the KV cache grows)."""
    longest = _profile_len(spec)
    trt = {
        "trt_fp16_enable": "True",
        "trt_int8_enable": "True" if spec.get("recipe") == "int8-static" else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "True",
    }
    if spec.get("kind") == "causal-lm":
        trt["trt_profile_min_shapes"] = shape_profile(spec, 0, 1)
        trt["trt_profile_opt_shapes"] = shape_profile(spec, longest // 2, 1)
        trt["trt_profile_max_shapes"] = shape_profile(spec, longest - 1, longest)
    return {"TensorrtExecutionProvider": trt}


def trtexec_argv(trtexec: str, onnx_path: str, spec: dict, prompt_tokens: int = 64) -> list[str]:
    """trtexec timing one decode step after a ``prompt_tokens`` prompt (fp16, plus int8 for int8-static)."""
    argv = [trtexec, f"--onnx={onnx_path}", "--fp16", "--warmUp=500", "--duration=5", "--avgRuns=20"]
    if spec.get("recipe") == "int8-static":
        argv.append("--int8")
    if spec.get("kind") == "causal-lm":
        longest = _profile_len(spec)
        argv += [f"--minShapes={shape_profile(spec, 0, 1)}",
                 f"--optShapes={shape_profile(spec, prompt_tokens, 1)}",
                 f"--maxShapes={shape_profile(spec, longest - 1, 1)}"]
    return argv


_STAT = re.compile(r"(min|max|mean|median)\s*=\s*([0-9.]+)\s*ms")


def parse_trtexec(output: str) -> dict:
    """Latency figures from trtexec's performance summary (``GPU Compute Time`` / ``Latency`` lines)."""
    out = {}
    for line in output.splitlines():
        for label, key in (("GPU Compute Time:", "gpu_compute_ms"), ("Latency:", "latency_ms")):
            if label in line and key not in out:
                stats = {m.group(1): float(m.group(2)) for m in _STAT.finditer(line.split(label, 1)[1])}
                if stats:
                    out[key] = stats
        m = re.search(r"Throughput:\s*([0-9.]+)\s*qps", line)
        if m:
            out["throughput_qps"] = float(m.group(1))
    return out


register(Target(
    name="jetson",
    description="NVIDIA Jetson Orin over ssh: ONNX fp16 on onnxruntime TensorRT/CUDA EPs, int8-static alternative",
    formats=("onnx",),
    default_recipes={"onnx": "fp16"},
    transport="ssh",
    # SmolLM2-135M fp16 on an Orin Nano 8 GB: budgets for a responsive on-board assistant, not measured
    # limits. RSS is high on Jetson because CUDA / TensorRT libraries and the context live in process memory.
    budgets=Budgets(decode_tok_s_min=25.0, ttft_ms_max=400.0, peak_rss_mb_max=3072.0),
    device_profile=DeviceProfile(
        ort_providers=ORT_PROVIDERS,
        required_providers=REQUIRED_PROVIDERS,
        provider_options=provider_options,
        provider_cache_dir=TRT_CACHE_DIR,
        runtime_pip_hint=RUNTIME_PIP_HINT,
        trtexec=Trtexec(commands=TRTEXEC, argv=trtexec_argv, parse=parse_trtexec),
    ),
))
