"""Run the int8 model in TensorFlow Lite Micro's interpreter on the host (PyPI package tflite-micro).

The arena figure is what TFLM's RecordingMicroAllocator reports after AllocateTensors (head = the
planned activation buffers, tail = persistent structures), read from ``print_allocations``. That
figure is then verified: a fresh interpreter with exactly that arena is built and invoked in a child
process (TFLM aborts the process, it does not raise, when an arena is too small).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from exporter.errors import ExportFailedError
from exporter.quiet import quiet

# Generous arena for measuring (the recording allocator reports what was used, not what was given).
MEASURE_ARENA_BYTES = 8 << 20
_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL = re.compile(r"Arena allocation tail (\d+) bytes")


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise ExportFailedError("TensorFlow Lite Micro's Python interpreter is not installed",
                                hint="pip install tflite-micro") from None
    return runtime


def interpreter(model: bytes, arena_size: int = MEASURE_ARENA_BYTES):
    """A TFLM interpreter over ``model`` (tensors allocated)."""
    return _runtime().Interpreter.from_bytes(model, arena_size=arena_size)


def measure_arena(model: bytes) -> dict:
    """Tensor arena bytes TFLM allocated for ``model``: {"total", "head", "tail"}."""
    it = interpreter(model)
    with quiet() as out:  # print_allocations writes from C++ straight to the descriptors
        it.print_allocations()
    text = out.text
    m = _TOTAL.search(text)
    if not m:
        raise ExportFailedError("TFLite Micro did not report its arena usage",
                                hint=f"print_allocations said: {text.strip()[:200]!r}")
    figures = {"total": int(m.group(1))}
    for key, rx in (("head", _HEAD), ("tail", _TAIL)):
        if mm := rx.search(text):
            figures[key] = int(mm.group(1))
    return figures


_VERIFY = """
import sys, numpy as np
from tflite_micro.python.tflite_micro import runtime
model = open(sys.argv[1], "rb").read()
it = runtime.Interpreter.from_bytes(model, arena_size=int(sys.argv[2]))
d = it.get_input_details(0)
it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
it.invoke()
it.get_output(0)
print("ok")
"""


def verify_arena(model: bytes, arena_bytes: int, timeout: float = 120) -> bool:
    """True when the model allocates and runs in an arena of exactly ``arena_bytes`` (checked in a child)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(model)
        proc = subprocess.run([sys.executable, "-c", _VERIFY, str(path), str(arena_bytes)],
                              capture_output=True, text=True, timeout=timeout)
    return proc.returncode == 0 and proc.stdout.strip().endswith("ok")


def run_batch(model: bytes, inputs_q: np.ndarray) -> np.ndarray:
    """int8 outputs of ``model`` for each int8 input in ``inputs_q`` (n, *input_shape[1:]), one invoke each."""
    it = interpreter(model)
    outs = []
    for x in inputs_q:
        it.set_input(x[None].astype(np.int8), 0)
        it.invoke()
        outs.append(np.array(it.get_output(0)).reshape(-1))
    return np.stack(outs) if outs else np.zeros((0, 0), np.int8)


def runtime_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("tflite-micro")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
