"""Sweeps: a matrix of models x targets x formats x recipes, exported in a bounded local pool or on Ray.

    slm-export sweep SWEEP.toml --out DIR [--jobs N] [--ray auto|ADDRESS] [--resume] [--skip-impossible]

Every cell is ``pipeline.run`` of one ``ExportRequest``; its bundle goes to ``OUT/<model>-<target>-<format>-<recipe>/``
through the export's own staging folder and rename, so a killed cell leaves nothing half-written.

The package, one module a concern (each imports only those above it):

* ``sweepfile``: the sweep file (Sweep, Model, Cell, load_sweep, check_cells: impossible cells before any work);
* ``cell``: one cell where a worker runs it (run_cell, statuses, its log in ``OUT/logs/``);
* ``local``: the bounded pool of spawned processes (cores, memory, --jobs; a lost worker's cells re-run);
* ``ray_backend``: each cell a Ray task with CPU and memory requests and ``max_retries`` (ray imported lazily);
* ``display``: progress while it runs (done / running / failed, ETA);
* ``summary``: summary.json, summary.html and the terminal's table;
* ``run``: the driver (plan_cells, resume_state, execute with Ctrl-C, run_sweep).
"""

from __future__ import annotations

from .cell import CANCELLED, ERROR, GATE_FAILED, IMPOSSIBLE, OK, SKIPPED, run_cell
from .run import SweepInterrupted, SweepRun, run_sweep
from .sweepfile import Cell, Model, Sweep, SweepFileError, check_cells, load_sweep

FAILED = (GATE_FAILED, ERROR, CANCELLED)  # the statuses that make the sweep exit non-zero

__all__ = ["CANCELLED", "ERROR", "FAILED", "GATE_FAILED", "IMPOSSIBLE", "OK", "SKIPPED", "Cell", "Model", "Sweep",
           "SweepFileError", "SweepInterrupted", "SweepRun", "check_cells", "load_sweep", "run_cell", "run_sweep"]
