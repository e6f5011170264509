"""Runtime-agnostic text generation over any slm-export causal-LM bundle (onnx, tflite, pte).

Everything here is built on ``exporter.runtime.open_runner`` (device-side code: numpy + the runtime)
plus the ``tokenizers`` library and ``jinja2`` for chat templates; no torch, no transformers.
"""

from .bundle import AppError, Bundle, default_bundle_dir, open_bundle, resolve_bundle
from .generate import Generation, generate
from .kv import KVSession
from .sampling import Sampler, SamplingConfig
from .detok import StreamDecoder, StopStringFilter, token_bytes_table

__all__ = ["AppError", "Bundle", "default_bundle_dir", "open_bundle", "resolve_bundle", "Generation", "generate",
           "KVSession", "Sampler", "SamplingConfig", "StreamDecoder", "StopStringFilter",
           "token_bytes_table"]
