"""The local backend: cells in a bounded pool of spawned processes on this machine.

Workers = min(cores, available memory / memory per export, --jobs, cells). A worker that dies (killed,
out of memory) breaks a ``ProcessPoolExecutor`` and every cell then running in it; those cells come back
as ``LOST`` and the driver runs them again in a fresh pool (up to the sweep's ``max_retries``).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .cell import ERROR, init_worker, run_cell

LOST = "lost"  # what ``wait`` yields for a cell whose worker died
GB = 1024 ** 3


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pool_size(cells: int, jobs: int | None, memory_gb_per_cell: float, cpus_per_cell: int = 1) -> tuple[int, str]:
    """(workers, why): the smallest of cores / cpus per cell, available memory / memory per cell, --jobs, cells."""
    import psutil

    available = psutil.virtual_memory().available
    bounds = {"cores": max(1, cores() // cpus_per_cell),
              "memory": max(1, int(available // (memory_gb_per_cell * GB))),
              "--jobs": jobs or cells, "cells": max(1, cells)}
    workers = min(bounds.values())
    why = (f"{cores()} cores / {cpus_per_cell} per cell, {available / GB:.1f} GB available / "
           f"{memory_gb_per_cell:g} GB per cell" + (f", --jobs {jobs}" if jobs else ""))
    return workers, why


class LocalPool:
    """Submit cells to spawned worker processes; ``wait`` yields (handle, result or LOST)."""

    name = "local pool"

    def __init__(self, workers: int, log: str | None = None):
        self.workers, self.log = workers, log
        # Each worker gets its share of the cores for PyTorch (a serial run, one worker, keeps them all).
        self.torch_threads = max(1, cores() // workers) if workers > 1 else None
        self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(self.torch_threads, self.log))
        return self._pool

    def submit(self, name: str, req):
        try:
            return self._executor().submit(run_cell, name, req, self.torch_threads)
        except BrokenProcessPool:
            self._discard()
            return self._executor().submit(run_cell, name, req, self.torch_threads)

    def wait(self, handles: list, timeout: float) -> list[tuple[object, object]]:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for future in done:
            try:
                out.append((future, future.result()))
            except BrokenProcessPool:
                out.append((future, LOST))
            except BaseException as e:  # noqa: BLE001 - e.g. the worker's KeyboardInterrupt, a pickling error
                out.append((future, {"status": ERROR, "error": f"{type(e).__name__}: {e}"}))
        if any(r is LOST for _, r in out):
            self._discard()
        return out

    def cancel(self, handles: list, grace_s: float) -> None:
        """Stop every running cell: SIGTERM its worker (it unwinds, removing its staging folder), then kill."""
        if self._pool is None:
            return
        processes = list((self._pool._processes or {}).values())  # noqa: SLF001 - the workers to stop
        # First: a worker that has unwound goes back for work and gets the pool's stop sentinel, so it
        # exits at once instead of idling through the grace time.
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(grace_s)
            if p.is_alive():
                p.kill()
                p.join(5)
        self._discard()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
