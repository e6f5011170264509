"""One cell of a sweep, run where a worker runs it (a local pool process or a Ray task).

``run_cell`` is the export itself (``pipeline.run``, which writes the bundle in a staging folder beside
``OUT/<cell>`` and publishes it with one rename) with the cell's output going to ``OUT/logs/<cell>.log``;
it returns plain data, never raises for a failed export (a failed cell does not stop the others), and
lets KeyboardInterrupt through so a cancelled cell unwinds and removes its staging folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

from ..terminal import restore_std_fds

LOGS = "logs"
# Statuses of a cell in the summary.
OK, GATE_FAILED, ERROR, SKIPPED, IMPOSSIBLE, CANCELLED = ("ok", "gate failed", "error", "skipped-resume",
                                                          "impossible", "cancelled")


def init_worker(torch_threads: int | None, log: str | None = None) -> None:
    """A pool worker's start: Ctrl-C is the driver's to handle (it stops the workers with SIGTERM, which
    unwinds like Ctrl-C so the staging folder is removed); what the worker prints outside a cell goes to
    ``log``; PyTorch gets the worker's share of the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    set_threads(torch_threads)


def set_threads(torch_threads: int | None) -> None:
    """Give this process's PyTorch ``torch_threads`` threads (None: leave it), so workers do not oversubscribe."""
    if torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
        import torch

        torch.set_num_threads(torch_threads)


def run_cell(name: str, req, torch_threads: int | None = None) -> dict:
    """Run the export ``req`` (an ``ExportRequest`` whose ``out`` is ``OUT/<name>``); its result as plain data."""
    from ..errors import ParityGateFailed, SlmExportError, condense
    from ..pipeline import run

    set_threads(torch_threads)
    start = time.perf_counter()
    result = {"cell": name, "host": socket.gethostname(), "pid": os.getpid()}
    with _log_to(Path(req.out).parent / LOGS / f"{name}.log") as progress:
        try:
            manifest = run(req, progress)
            result |= {"status": OK if manifest["parity"]["passed"] else GATE_FAILED, "figures": figures(manifest)}
        except ParityGateFailed as e:
            result |= {"status": GATE_FAILED, "error": _first_line(e.message)}
        except SlmExportError as e:
            result |= {"status": ERROR, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - one cell's bug must not hide the others' results
            result |= {"status": ERROR, "error": f"internal error: {condense(e, limit=500)}"}
        finally:
            result["seconds"] = round(time.perf_counter() - start, 2)
        if result.get("error"):
            progress(f"cell {name}: {result['status']}: {result['error']}")
    return result


def figures(manifest: dict) -> dict:
    """What the summary shows of a bundle: size, parity (its metrics whole), decode speed."""
    parity = manifest.get("parity") or {}
    latency = ((manifest.get("latency") or {}).get("latency")) or {}
    metrics = parity.get("metrics", {})
    return {"bytes": manifest.get("artifact", {}).get("bytes"), "passed": parity.get("passed"),
            "top1_agreement": metrics.get("top1_agreement"), "ppl_rel_change": metrics.get("ppl_rel_change"),
            "decode_tok_s": latency.get("decode_tok_s"), "parity": metrics, "failures": parity.get("failures", [])}


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


@contextlib.contextmanager
def _log_to(path: Path):
    """Descriptors 1 and 2 into ``path`` (what libraries print, C++ included) while the cell runs; yields
    a progress callback writing timestamped lines there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    start = time.perf_counter()

    def progress(message: str) -> None:
        os.write(fd, f"{time.perf_counter() - start:7.1f}s {message}\n".encode())

    try:
        yield progress
    finally:
        restore_std_fds(saved)
        for d in (*saved, fd):
            os.close(d)
