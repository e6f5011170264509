"""One-line error messages from library exceptions (converters, runtimes, loaders).

Part of the device-side runtime (it imports nothing); the exporter uses the same function through
``exporter.errors.condense``, so every one-line error is condensed the same way.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch.onnx puts the cause after a "## Exception summary" header, as "<class 'pkg.mod.Error'>: text".
_SUMMARY = "Exception summary"
_CLASS = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>: ")
# MLIR diagnostics start with a long location, ``loc("module.path"): error: ...``; keep the message.
_MLIR_LOCATION = '"): '


def condense(e: BaseException, limit: int = 300, typed: bool = True) -> str:
    """The informative line of ``e``, at most ``limit`` characters; ``Type: line`` when ``typed``.

    That line is the first one (a traceback, hints and links follow it), or the first one after
    torch.onnx's exception summary; a line ending in ':' (MLIR's "Verification failed:") is joined
    with the next.
    """
    text = _line(_ANSI.sub("", str(e)))
    if typed:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return (text or type(e).__name__)[:limit]


def _line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    summary = next((i for i, ln in enumerate(lines) if _SUMMARY in ln), None)
    if summary is not None and summary + 1 < len(lines):
        lines = lines[summary + 1:]
    if not lines:
        return ""
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    if _MLIR_LOCATION in text:
        text = text.split(_MLIR_LOCATION, 1)[1]
    return _CLASS.sub(r"\1: ", text, count=1)
