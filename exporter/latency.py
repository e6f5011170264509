"""Host latency check: run the device-side runner (``exporter.runtime.main``) on the staged bundle.

It runs in a fresh process so that load time and peak RSS are those of the runtime and the artifact
alone, not of the PyTorch reference this process holds; the same script runs on devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import SlmExportError


def measure_on_host(bundle_dir: Path, decode_tokens: int = 64, repeats: int = 3, warmup: int = 1,
                    threads: int | None = None, timeout_s: float = 1800, verify_files: bool = True) -> dict:
    """Latency figures (load, TTFT, prefill/decode tok/s, per-token percentiles, peak RSS) on this machine."""
    cmd = [sys.executable, "-m", "exporter.runtime.main", str(bundle_dir), "--decode-tokens", str(decode_tokens),
           "--repeats", str(repeats), "--warmup", str(warmup), "--json"]
    if not verify_files:
        cmd.append("--no-verify")
    if threads:
        cmd += ["--threads", str(threads)]
    project_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = project_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise SlmExportError(f"latency check did not finish within {timeout_s:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "error" in result or not result:
        detail = result.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlmExportError(f"latency check failed: {detail}")
    return result
