"""The sweep's driver: check every cell, skip what ``--resume`` finds done, run the rest on a backend.

The backend is the local pool (``local.LocalPool``) or a Ray cluster (``ray_backend.RayCluster``); both
take ``submit(name, request)`` and yield results from ``wait``. The driver keeps at most the backend's
slots in flight, so "running" means running and Ctrl-C has nothing queued to unpick: it stops every
running cell (each unwinds and removes its staging folder), removes what a killed one left, and marks
the rest cancelled.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import bundle
from ..errors import SlmExportError
from .cell import CANCELLED, ERROR, IMPOSSIBLE, LOGS, SKIPPED, figures
from .local import LOST
from .sweepfile import Cell, Sweep, check_cells

POLL_S = 0.5
CANCEL_GRACE_S = 15.0


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a sweep; ``results`` holds every cell, finished or cancelled."""

    def __init__(self, results: dict):
        super().__init__("interrupted")
        self.results = results


@dataclass
class SweepRun:
    """What a sweep did: per cell result (in matrix order) and how it ran."""

    results: dict[str, dict]
    backend: str
    workers: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def plan_cells(sweep: Sweep, out: Path, skip_impossible: bool, resume: bool) -> tuple[list[Cell], dict]:
    """(cells to run, results already known): impossible cells refused (or set aside), done ones skipped.

    Raises before anything is created: one error listing every impossible cell (without
    ``--skip-impossible``), or every cell whose folder already holds something (without ``--resume``).
    """
    impossible = check_cells(sweep)
    if impossible and not skip_impossible:
        listing = "\n".join(f"  {c.name}: {why}" for c, why in impossible)
        raise SlmExportError(f"{len(impossible)} of {len(sweep.cells)} cells of {sweep.path} are impossible:\n{listing}",
                             hint="nothing was run; change the sweep file or pass --skip-impossible to run the rest")
    known = {c.name: {"cell": c.name, "status": IMPOSSIBLE, "error": why} for c, why in impossible}
    todo = [c for c in sweep.cells if c.name not in known]
    existing = [c for c in todo if (out / c.name).exists() and any((out / c.name).iterdir())]
    if existing and not resume:
        raise SlmExportError(f"{out} already holds {len(existing)} of the sweep's bundles ({', '.join(c.name for c in existing[:3])}"
                             f"{', ...' if len(existing) > 3 else ''})",
                             hint="pass --resume to keep the verified ones and redo the rest, or choose another --out")
    check_out(out, sweep)
    return todo, known


def check_out(out: Path, sweep: Sweep) -> None:
    """Refuse an OUT that is a file, or is (or holds) a model of the sweep, the model cache or the current folder."""
    from ..loading import default_cache_dir

    if out.exists() and not out.is_dir():
        raise SlmExportError(f"--out {out} exists and is not a folder")
    resolved = out.resolve()
    protected = [Path(m.spec) for m in sweep.models if m.spec and Path(m.spec).exists()]
    for path in (*protected, Path(sweep.options.get("cache_dir") or default_cache_dir()), Path.cwd()):
        held = path.resolve()
        if resolved == held or resolved in held.parents:
            raise SlmExportError(f"--out {out} is {'' if resolved == held else 'a parent of '}{path}: the sweep's "
                                 "bundles would replace it", hint="choose a new folder, e.g. --out sweeps/NAME")


def resume_state(cell: Cell, out: Path) -> tuple[bool, dict | None]:
    """(redo with force, skipped result): a bundle that verifies and is this cell's is skipped; any other
    bundle is redone (replaced); a folder that is not a bundle is left for the export to refuse."""
    folder = out / cell.name
    if not folder.exists() or not bundle.is_bundle(folder):
        return False, None
    import json

    try:
        problems = bundle.verify(folder)
    except SlmExportError as e:
        problems = [str(e)]
    manifest = json.loads((folder / "manifest.json").read_text())
    same = (manifest.get("target"), manifest.get("format"), manifest.get("recipe")) == (cell.target, cell.format, cell.recipe)
    if problems or not same:
        return True, None
    return False, {"cell": cell.name, "status": SKIPPED, "figures": figures(manifest),
                   "note": "bundle present and verified (--resume)"}


def execute(sweep: Sweep, cells: list[Cell], out: Path, backend, slots: int, force: set[str],
            events: Callable[[str, str, dict | None], None]) -> dict[str, dict]:
    """Run ``cells`` on ``backend``, at most ``slots`` at once; a lost worker's cell is run again
    (``sweep.max_retries``). ``events(kind, cell, result)`` reports start / done / retry.
    Ctrl-C raises ``SweepInterrupted`` with every cell's result (unfinished ones cancelled)."""
    pending, running, results = deque(cells), {}, {}
    attempts = {c.name: 0 for c in cells}
    try:
        while pending or running:
            while pending and len(running) < slots:
                cell = pending.popleft()
                attempts[cell.name] += 1
                req = sweep.request(cell, out / cell.name, force=cell.name in force)
                running[backend.submit(cell.name, req)] = cell
                events("start", cell.name, None)
            for handle, result in backend.wait(list(running), POLL_S):
                cell = running.pop(handle)
                if result is LOST:
                    if attempts[cell.name] <= sweep.max_retries:
                        events("retry", cell.name, None)
                        pending.appendleft(cell)
                        continue
                    result = {"status": ERROR, "error": f"its worker died {attempts[cell.name]} times (killed or out of memory)"}
                result = {"cell": cell.name, **result, "attempts": attempts[cell.name]}
                results[cell.name] = result
                events("done", cell.name, result)
    except KeyboardInterrupt:
        try:
            backend.cancel(list(running), CANCEL_GRACE_S)
        except KeyboardInterrupt:  # a second Ctrl-C: no grace
            backend.cancel(list(running), 0)
        for cell in [*running.values(), *pending]:
            remove_leftovers(out / cell.name)
            results[cell.name] = {"cell": cell.name, "status": CANCELLED, "error": "interrupted (Ctrl-C) before it finished"}
        raise SweepInterrupted(results) from None
    return results


def remove_leftovers(out: Path) -> None:
    """What a stopped export left beside ``out`` (staging folders, a lock), once no process holds it."""
    bundle.clean_leftovers(out)


def run_sweep(sweep_path: Path, out: Path, jobs: int | None = None, ray: str | None = None, resume: bool = False,
              skip_impossible: bool = False, console=None) -> tuple[Sweep, SweepRun]:
    """The whole ``slm-export sweep``: every check before any work, then the cells, then the summary files.

    Ctrl-C raises ``SweepInterrupted`` after the summary (with the cancelled cells) is written.
    """
    from rich.console import Console

    from . import summary
    from .display import SweepProgress
    from .sweepfile import load_sweep

    console = console or Console(stderr=True, highlight=False)
    sweep = load_sweep(sweep_path)
    out = out.expanduser().resolve()  # workers (Ray's too) run elsewhere: every path they get is absolute
    todo, known = plan_cells(sweep, out, skip_impossible, resume)
    force = set()
    if resume:
        for cell in todo:
            redo, skipped = resume_state(cell, out)
            if skipped:
                known[cell.name] = skipped
            elif redo:
                force.add(cell.name)
        todo = [c for c in todo if c.name not in known]
    backend, workers, how = _backend(sweep, ray, jobs, len(todo), out)
    run = SweepRun(results=dict(known), backend=backend.name, workers=workers, notes=[how])
    _announce(console, sweep, run, known, force, how)
    progress = SweepProgress(console, len(todo), workers)
    start = time.perf_counter()
    try:
        with progress.running_display():
            run.results |= execute(sweep, todo, out, backend, workers, force, progress)
    except SweepInterrupted as e:
        run.results |= e.results
        run.seconds = time.perf_counter() - start
        summary.write(run, sweep, out)
        raise
    finally:
        backend.close()
    run.seconds = time.perf_counter() - start
    summary.write(run, sweep, out)
    return sweep, run


def _backend(sweep: Sweep, ray: str | None, jobs: int | None, cells: int, out: Path):
    """(backend, workers, how it was sized); connecting to Ray happens here, before OUT is created."""
    if ray:
        from .ray_backend import RayCluster

        cluster = RayCluster(ray, sweep.cpus_per_cell, sweep.memory_gb_per_cell, sweep.max_retries)
        workers = max(1, min(cluster.slots, jobs or cluster.slots, cells))
        out.mkdir(parents=True, exist_ok=True)
        return cluster, workers, f"Ray cluster at {ray}: {cluster.describe()}; {workers} cell(s) at once"
    from .local import LocalPool, pool_size

    workers, why = pool_size(cells, jobs, sweep.memory_gb_per_cell, sweep.cpus_per_cell)
    out.mkdir(parents=True, exist_ok=True)
    return LocalPool(workers, str(out / LOGS / "workers.log")), workers, f"local pool of {workers} worker(s) ({why})"


def _announce(console, sweep: Sweep, run: SweepRun, known: dict, force: set, how: str) -> None:
    from rich.markup import escape

    skipped = [n for n, r in known.items() if r["status"] == SKIPPED]
    impossible = [(n, r["error"]) for n, r in known.items() if r["status"] == IMPOSSIBLE]
    console.print(escape(f"sweep {sweep.path}: {len(sweep.cells)} cells; {how}"), highlight=False)
    for name, why in impossible:
        console.print(escape(f"  skipped (impossible): {name}: {why}"), highlight=False)
    if skipped:
        console.print(escape(f"  --resume: {len(skipped)} cell(s) already done and verified: {', '.join(skipped)}"),
                      highlight=False)
    if force:
        console.print(escape(f"  --resume: redoing {len(force)} bundle(s) that do not verify: {', '.join(sorted(force))}"),
                      highlight=False)
