"""How long one sweep of tiny models takes serial (--jobs 1), in the local pool (--jobs 2) and on a local
Ray cluster (2 CPUs), as ratios. Figures, not a test: the README's "Sweeps" section quotes them.

    python benchmarks/sweep_speed.py [--work DIR] [--no-ray]

The sweep: tiny random llama and qwen2 models (tests/tiny_models.py) x host x onnx x fp32, int8-dynamic,
4 decode tokens of latency. Each run is the real CLI (`python -m exporter.cli sweep`), wall time included
its start-up; the parity figures of every run's bundles are compared with the serial run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SWEEP = """targets = ["host"]
formats = ["onnx"]
recipes = ["fp32", "int8-dynamic"]
memory_gb_per_cell = 1
[[model]]
name = "llama"
path = "llama"
[[model]]
name = "qwen2"
path = "qwen2"
[options]
decode_tokens = 4
repeats = 1
"""


def sweep(work: Path, name: str, *args) -> float:
    """Wall seconds of one ``slm-export sweep`` into ``work/name``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "sweep", str(work / "SWEEP.toml"), "--out",
                           str(work / name), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def parity(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {c["cell"]: c["figures"]["parity"] for c in summary["cells"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    from tiny_models import make_model_dir

    work = args.work or Path(tempfile.mkdtemp(prefix="sweep-speed-"))
    for arch in ("llama", "qwen2"):
        if not (work / arch).exists():
            make_model_dir(arch, work / arch)
    (work / "SWEEP.toml").write_text(SWEEP)
    for name in ("serial", "pool", "ray"):
        shutil.rmtree(work / name, ignore_errors=True)
    times = {"serial": sweep(work, "serial", "--jobs", "1"), "pool": sweep(work, "pool", "--jobs", "2")}
    if not args.no_ray:
        import ray

        ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 ** 2,
                       _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
        try:
            times["ray"] = sweep(work, "ray", "--ray", ctx.address_info["gcs_address"])
        finally:
            ray.shutdown()
    reference = parity(work / "serial")
    for name in times:
        assert parity(work / name) == reference, f"{name}: parity figures differ from the serial run's"
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    print(", ".join(f"{k} {v:.1f} s ({times['serial'] / v:.2f}x serial)" for k, v in times.items()))


if __name__ == "__main__":
    main()
