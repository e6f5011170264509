"""What a sweep shows while it runs: cells done / running / failed and an ETA.

On a terminal one rich bar (the counts and the ETA beside it) with a line per finished cell above it;
into a log (CI, ``| tee``) a timestamped line per event with the same counts, no control codes.
"""

from __future__ import annotations

import contextlib
import time

from ..terminal import duration
from .cell import GATE_FAILED, OK, SKIPPED


class SweepProgress:
    """The ``events(kind, cell, result)`` callback of ``run.execute``, drawn on ``console``."""

    def __init__(self, console, total: int, workers: int):
        self.console, self.total, self.workers = console, total, workers
        self.start = time.perf_counter()
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.cell_seconds: list[float] = []
        self._progress = self._task = None

    def eta(self) -> float | None:
        """Seconds left: the mean finished cell's time x the cells left, spread over the workers."""
        if not self.cell_seconds:
            return None
        left = self.total - self.done
        return sum(self.cell_seconds) / len(self.cell_seconds) * left / max(1, min(self.workers, left or 1))

    def counts(self) -> str:
        eta = self.eta()
        return (f"{self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed"
                + (f", ETA {duration(eta)}" if eta is not None and self.done < self.total else ""))

    def __call__(self, kind: str, cell: str, result: dict | None) -> None:
        if kind == "start":
            self.running.add(cell)
            message = f"cell {cell}: started"
        elif kind == "retry":
            self.running.discard(cell)
            message = f"cell {cell}: its worker died; running it again"
        else:
            self.running.discard(cell)
            self.done += 1
            status = result["status"]
            if status not in (OK, SKIPPED):
                self.failed += 1
            if isinstance(result.get("seconds"), (int, float)) and status in (OK, GATE_FAILED):
                self.cell_seconds.append(result["seconds"])
            took = f" in {duration(result['seconds'])}" if isinstance(result.get("seconds"), (int, float)) else ""
            message = f"cell {cell}: {status}{took}" + (f": {result['error'].splitlines()[0]}" if result.get("error") else "")
        self._show(message, style="red" if kind == "done" and result["status"] not in (OK, SKIPPED) else "")

    def _show(self, message: str, style: str = "") -> None:
        from rich.markup import escape

        stamp = f"[dim]{time.perf_counter() - self.start:7.1f}s[/dim] "
        body = f"[{style}]{escape(message)}[/{style}]" if style else escape(message)
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, counts=self.counts())
            self._progress.console.print(stamp + body, highlight=False, soft_wrap=True)
        else:
            self.console.print(stamp + body + escape(f"  ({self.counts()})"), highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def running_display(self):
        """The live bar while the block runs (on a terminal only)."""
        if not (self.console.is_terminal and not self.console.is_dumb_terminal):
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[counts]}"), console=self.console, transient=True,
                      refresh_per_second=4) as progress:
            self._progress = progress
            self._task = progress.add_task("sweep", total=self.total, counts=self.counts())
            try:
                yield self
            finally:
                self._progress = None
