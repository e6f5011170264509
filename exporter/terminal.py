"""What a person sees while a command works: stage lines, progress bars, and library output minus known noise.

``Terminal`` is the ``progress`` reporter the CLI hands to the pipeline (see ``exporter/progress.py``):

- On a terminal, rich draws a live bar per running task (done / total with an estimate, or elapsed
  time against the same step's duration in the last run on this machine); stage lines scroll above.
- Into a log (a pipe, a file, CI), there is no live display: plain timestamped lines, one when a task
  starts, one when it ends, and a heartbeat line every ``HEARTBEAT_S`` while it runs, so a log never
  goes silent for minutes. Library progress bars (tqdm's ``\\r`` updates) become one line each.
- What libraries print (Python and C++, on descriptors 1 and 2) is read through a pipe while the
  command runs and shown above the bars, except the lines in ``NOISE``: known, harmless messages these
  pinned versions print on every run. ``--verbose`` shows everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HEARTBEAT_S = 30.0
HEARTBEAT_POLL_S = 5.0  # how often the heartbeat thread looks at the running tasks
QUIET_S = 10.0  # in a log: count lines at most this often, and no "done" line for a task shorter than this

# Known noise of the pinned toolchain, matched per line (each with why it is harmless). Only these go;
# any other warning is shown. A Python warning's source line (the indented line after it) goes with it.
NOISE = tuple(re.compile(p) for p in (
    # torchao probes CUDA-only kernels (mxfp8, cutlass) at import; the CPU wheel has none by design.
    r"Failed to load .*_C_(mxfp8|cutlass)",
    r"_C_cutlass_90a\.abi3\.so|_C_mxfp8.*\.so",
    r"is an Enum subclass and is now natively supported by torch.compile",
    # torch's operator registry looks for torchvision's ops, which nothing here uses.
    r"torchvision is not installed\. Skipping torchvision::",
    r"isinstance\(treespec, LeafSpec\)",
    # torch.onnx dynamo: dynamic axes are named for it but it keeps its own symbol names.
    r"The axis name: \w+ will not be used",
    r"^shares the same shape constraints with another axis",  # the second line of that message
    # onnxruntime.quantization: pre-processing (shape inference) is done by our export already.
    r"Please consider to run pre-processing before quantization",
    # ExecuTorch's cpuinfo on x86 and in containers: it reads an ARM-only sysfs file.
    r"cpuinfo_utils\.cpp.*Failed to open midr file",
    # torch.export: the KV cache buffers are mutated in place on purpose (that is the static cache).
    r"Mutation on a buffer",
))
_WARNING_HEADER = re.compile(r":\d+: \w*Warning: ")


def is_noise(line: str) -> bool:
    """Whether ``line`` is one of the known harmless messages in ``NOISE``."""
    return any(p.search(line) for p in NOISE)


class History:
    """How long each task took in the last run of the same export on this machine (the estimates).

    Stored as JSON in the model cache (``timings.json``), keyed by the run (model, format, recipe) and
    the task's description; a missing or unreadable file just means no estimates yet.
    """

    MAX_ENTRIES = 400  # every model path and recipe adds a few; tests export many temporary models

    def __init__(self, path: Path | None, run_key: str):
        self.path, self.run_key = path, run_key
        self._data: dict = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                self._data = json.loads(path.read_text())

    def _key(self, description: str) -> str:
        return f"{self.run_key} :: {description}"

    def estimate(self, description: str) -> float | None:
        """Seconds the task took last time, or None."""
        value = self._data.get(self._key(description))
        return float(value) if isinstance(value, (int, float)) else None

    def record(self, description: str, seconds: float) -> None:
        key = self._key(description)
        self._data.pop(key, None)  # re-inserted last: the file keeps the most recent MAX_ENTRIES
        self._data[key] = round(seconds, 1)
        while len(self._data) > self.MAX_ENTRIES:
            self._data.pop(next(iter(self._data)))

    def save(self) -> None:
        """Write the file atomically (a second run at the same time must not read half a file)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._data, indent=1))  # insertion order: oldest first
            os.replace(tmp, self.path)


def duration(seconds: float) -> str:
    """``seconds`` for people: 42 s, 5 min 08 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _PlainTask:
    """A task in a log: a start line, progress lines for counts, heartbeats, an end line."""

    def __init__(self, terminal: Terminal, description: str, total: int | None, estimate: float | None):
        self.terminal, self.description, self.total, self.estimate = terminal, description, total, estimate
        self.done = 0
        self.start = time.perf_counter()
        self._last_line = self.start

    def advance(self, units: int = 1) -> None:
        self.done += units
        now = time.perf_counter()
        if self.total and self.done < self.total and now - self._last_line >= QUIET_S:
            self.terminal.line(f"  {self.description}: {self.done}/{self.total}, {duration(now - self.start)}")
            self._last_line = now

    def heartbeat(self) -> None:
        now = time.perf_counter()
        if now - self._last_line < HEARTBEAT_S:
            return
        self._last_line = now
        so_far = f"{duration(now - self.start)} so far"
        if self.estimate:
            so_far += f" (last run: {duration(self.estimate)})"
        count = f", {self.done}/{self.total}" if self.total else ""
        self.terminal.line(f"  ... {self.description}: {so_far}{count}")


class _LiveTask:
    """A task on a terminal: one row of the rich progress display."""

    def __init__(self, progress, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, units: int = 1) -> None:
        self.progress.advance(self.task_id, units)


class Terminal:
    """The CLI's progress reporter: call it with a stage message, or use ``task`` for long work."""

    def __init__(self, console, history: History | None = None, verbose: bool = False):
        self.console, self.history, self.verbose = console, history or History(None, ""), verbose
        self.start = time.perf_counter()
        self.live = console.is_terminal and not console.is_dumb_terminal
        self._progress = None
        self._plain_tasks: list[_PlainTask] = []
        self._lock = threading.Lock()

    # -- what stages call --------------------------------------------------------------------
    def __call__(self, message: str) -> None:
        """A stage line: elapsed time since the command started, and the message."""
        self.line(message)

    def line(self, text: str, style: str = "") -> None:
        from rich.markup import escape

        stamp = f"[dim]{time.perf_counter() - self.start:7.1f}s[/dim] "
        body = f"[{style}]{escape(text)}[/{style}]" if style else escape(text)
        with self._lock:
            self.console.print(stamp + body, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator:
        """Show ``description`` as running (with ``total`` units, or none) until the block ends."""
        estimate = self.history.estimate(description)
        if estimate is not None and estimate < QUIET_S:
            estimate = None  # "last run 0 s" on every short step is clutter
        hint = f"last run {duration(estimate)}" if estimate else ""
        t0 = time.perf_counter()
        if self._progress is not None:
            task_id = self._progress.add_task(description, total=total, hint=hint)
            running = _LiveTask(self._progress, task_id)
        else:
            self.line(description + (f" ({hint})" if hint else ""))
            running = _PlainTask(self, description, total, estimate)
            self._plain_tasks.append(running)
        ok = False
        try:
            yield running
            ok = True
        finally:
            took = time.perf_counter() - t0
            if self._progress is not None:
                self._progress.remove_task(task_id)
            else:
                self._plain_tasks.remove(running)
            if ok:
                self.history.record(description, took)
                if self._progress is not None or took >= QUIET_S:
                    self.line(f"  done: {description} in {duration(took)}", style="green")

    # -- the CLI's side -----------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[Terminal]:
        """While the command runs: the live display (or heartbeats) and the library-output filter."""
        with contextlib.ExitStack() as stack:
            if self.live:
                self._progress = stack.enter_context(_live_progress(self.console))
            else:
                stack.enter_context(self._heartbeats())
            stack.enter_context(library_output(self._library_line, self.verbose))
            try:
                yield self
            finally:
                self.history.save()
        self._progress = None

    def _library_line(self, text: str) -> None:
        from rich.markup import escape

        with self._lock:
            self.console.print(f"[dim]{escape(text)}[/dim]", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def _heartbeats(self) -> Iterator[None]:
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_POLL_S):
                for t in list(self._plain_tasks):
                    t.heartbeat()

        thread = threading.Thread(target=beat, name="slm-export-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=HEARTBEAT_POLL_S + 1)


def _live_progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("[dim]{task.fields[hint]}"), console=console,
                    transient=True, refresh_per_second=4,
                    # Not rich's own stdout/stderr proxies: what Python code prints must reach the
                    # descriptors, where library_output filters it with what C++ code prints.
                    redirect_stdout=False, redirect_stderr=False)


def open_terminal(verbose: bool = False, history: History | None = None) -> Terminal:
    """A ``Terminal`` on this process's stderr as it is now (before ``library_output`` takes it over)."""
    from rich.console import Console

    return Terminal(Console(file=_own_stderr(), highlight=False), history, verbose)


def _own_stderr():
    """A stream the terminal keeps for itself: a duplicate of descriptor 2 when that is stderr, so its
    lines do not go through the library-output pipe; else Python's stderr (click's test runner)."""
    try:
        if sys.stderr.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stderr


@contextlib.contextmanager
def library_output(sink, verbose: bool = False) -> Iterator[None]:
    """Read what is written to descriptors 1 and 2 while the block runs and pass it to ``sink`` line
    by line: ``\\r``-updated lines as their final state, ``NOISE`` dropped (unless ``verbose``).

    Descriptor-level, because C++ code (ExecuTorch, TensorFlow, onnxruntime) writes there directly. When
    Python's streams are not those descriptors (click's test runner, pytest's capture), nothing is
    redirected: the block's output goes where it would have gone.
    """
    try:
        redirectable = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        redirectable = False
    if not redirectable:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    # The end marker is written on our own copy of the pipe: a child that inherited descriptor 2 and
    # outlives the block (an adb server) keeps the pipe open, so end-of-file may never come.
    marker = b"\x00slm-export-end\x00"
    reader = threading.Thread(target=_read_lines, args=(read_fd, marker, sink, verbose), daemon=True)
    reader.start()
    try:
        yield
    finally:
        restore_std_fds(saved)
        os.write(write_fd, b"\n" + marker)
        reader.join(timeout=5)
        for fd in (*saved, write_fd):
            os.close(fd)


def restore_std_fds(saved: tuple[int, int]) -> None:
    """Flush Python's streams, then point descriptors 1 and 2 back at ``saved`` (two ``os.dup`` copies)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)


def _read_lines(read_fd: int, marker: bytes, sink, verbose: bool) -> None:
    pending = b""
    skip_source_line = False
    try:
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            pending += chunk
            done = marker in pending
            if done:
                pending = pending.split(marker)[0]
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                # A progress bar rewrites its line with \r: keep its final state only.
                text = raw.decode("utf-8", "replace").split("\r")
                text = next((seg for seg in reversed(text) if seg.strip()), "").rstrip()
                if not text:
                    continue
                if skip_source_line and text.startswith((" ", "\t")):
                    skip_source_line = False
                    continue
                skip_source_line = False
                if not verbose and is_noise(text):
                    skip_source_line = bool(_WARNING_HEADER.search(text))
                    continue
                sink(text)
            if done:
                break
    finally:
        os.close(read_fd)
