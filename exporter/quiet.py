"""One way to silence what libraries print while they work (converters, quantizers, runtimes).

Converters print progress bars, size reports and per-tensor warnings from Python and from C++; the
CLI reports stages itself (``ExportOptions.progress``) and turns failures into one-line errors, so
that output only clutters it. ``quiet`` catches both kinds, keeping the text for an error message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator


class Captured:
    """What was written while ``quiet`` was active; ``text`` is complete once the block has exited."""

    text = ""


@contextlib.contextmanager
def quiet(log_level: int = logging.ERROR, env: dict[str, str] | None = None) -> Iterator[Captured]:
    """Silence stdout and stderr (Python's streams and file descriptors 1 and 2) and root-logger
    records below ``log_level``, with ``env`` set, while the block runs; yields the captured text.

    Descriptor-level capture is needed because C++ code (TensorFlow, MLIR, TFLM) writes to the
    descriptors directly; Python's streams are swapped too, since they may not be those descriptors
    (pytest, click's test runner). Where the descriptors cannot be duplicated, only Python's are.
    """
    captured = Captured()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, log_level))
    py_out = io.StringIO()
    try:
        with _env(env or {}), _fds() as fd_text, \
                contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_out):
            yield captured
    finally:
        root.setLevel(level)
        captured.text = py_out.getvalue() + fd_text.get("text", "")


@contextlib.contextmanager
def _fds() -> Iterator[dict]:
    """Point descriptors 1 and 2 at a temporary file; on exit put them back and read what came."""
    box: dict = {}
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no descriptors to redirect (a daemon with them closed)
        yield box
        return
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            buf.seek(0)
            box["text"] = buf.read().decode(errors="replace")


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (libraries' own quiet switches) and restore them afterwards."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
