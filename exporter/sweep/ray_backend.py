"""The Ray backend (``--ray auto|ADDRESS``): each cell a Ray task with CPU and memory requests.

Ray is imported only here, only when asked for (``pip install 'slm-export[cluster]'``). A task's bundle is
written by the task itself to the shared OUT path, through the export's own staging folder and rename, so a
worker lost mid-export leaves nothing half-written; Ray runs the task again (``max_retries``) and the
retry's export removes the dead attempt's staging folder first.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import SlmExportError
from .cell import ERROR, run_cell

GB = 1024 ** 3
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """The ``ray`` module, or one error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SlmExportError("--ray needs Ray, which is not installed",
                             hint="pip install 'slm-export[cluster]' (Ray 2.60.0)") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse at once (one error) a HOST:PORT nothing listens on; ``auto`` and ``ray://`` are Ray's to find."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SlmExportError(f"--ray {address!r} is not auto or HOST:PORT",
                             hint="give the head node's address, e.g. --ray 10.0.0.5:6379, or --ray auto on a node of the cluster")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SlmExportError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}",
                             hint="start it with `ray start --head` (or check the address and the firewall)") from None


class RayCluster:
    """Submit cells as Ray tasks on the cluster at ``address``; ``wait`` yields (handle, result)."""

    name = "Ray"

    def __init__(self, address: str, cpus_per_cell: int, memory_gb_per_cell: float, max_retries: int):
        self.ray = import_ray()
        check_reachable(address)
        source_root = str(Path(__file__).resolve().parents[2])  # workers import the same exporter as this driver
        env = {"PYTHONPATH": os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            self.ray.init(address=address, runtime_env={"env_vars": env}, logging_level="ERROR",
                          log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SlmExportError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}",
                                 hint="start it with `ray start --head`, or give its address (--ray HOST:PORT)") from None
        self.cpus_per_cell = cpus_per_cell
        self._task = self.ray.remote(_ray_cell).options(num_cpus=cpus_per_cell, memory=int(memory_gb_per_cell * GB),
                                                        max_retries=max_retries, retry_exceptions=False)

    @property
    def slots(self) -> int:
        """How many cells the cluster runs at once (its CPUs / CPUs per cell)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.cpus_per_cell))

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return (f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('memory', 0) / GB:.1f} GB; "
                f"{self.cpus_per_cell} CPU(s) per cell")

    def submit(self, name: str, req):
        return self._task.remote(name, req, self.cpus_per_cell)

    def wait(self, handles: list, timeout: float) -> list[tuple[object, object]]:
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=timeout)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.WorkerCrashedError:
                out.append((ref, {"status": ERROR, "error": "the Ray worker died every attempt (killed or out of memory)"}))
            except self.ray.exceptions.RayError as e:
                out.append((ref, {"status": ERROR, "error": f"Ray: {str(e).splitlines()[0]}"}))
        return out

    def cancel(self, handles: list, grace_s: float) -> None:
        """Interrupt every task (KeyboardInterrupt in the worker: its staging folder is removed), then force."""
        for ref in handles:
            self.ray.cancel(ref, force=False)
        _, left = self.ray.wait(handles, num_returns=len(handles), timeout=grace_s)
        for ref in left:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()


def _ray_cell(name: str, req, threads: int) -> dict:
    """The Ray task: ``run_cell`` with the task's CPUs as PyTorch's threads."""
    return run_cell(name, req, threads)
