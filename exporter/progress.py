"""How the stages report long work: a stage line, and a task with a count (or none) for what takes time.

Stages and formats receive ``progress``, a callable that takes one message (tests pass a lambda or
``print``). The CLI passes a ``terminal.Terminal``, which also draws a bar for each ``task``: counted
work (parity windows, latency repeats, training epochs) shows done / total and a time estimate;
work a library does in one call (torch.onnx export, XNNPACK lowering, a quantizer) shows elapsed
time against the duration of the same step in the last run on this machine.

    with task(progress, "parity windows", total=3) as t:
        for window in windows:
            ...
            t.advance()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Protocol


class Task(Protocol):
    """A running task: ``advance`` after each counted unit (no-op for a task without a count)."""

    def advance(self, units: int = 1) -> None: ...


class _Silent:
    def advance(self, units: int = 1) -> None:
        pass


@contextlib.contextmanager
def task(progress: Callable[[str], None], description: str, total: int | None = None) -> Iterator[Task]:
    """Run a block as a reported task of ``progress``.

    A reporter with its own ``task`` (the CLI's terminal) draws it; a plain callable gets the
    description as one message, so callers need not know which kind they were given.
    """
    own = getattr(progress, "task", None)
    if own is not None:
        with own(description, total) as running:
            yield running
        return
    progress(description)
    yield _Silent()
