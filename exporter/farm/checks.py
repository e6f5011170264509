"""The checks a run's results are judged by: parity, budget, providers, trtexec.

Each is a function of what the device reported (the runner's JSON, the probe) and of declared
facts (the recipe's thresholds, the target's budgets and DeviceProfile, the transport's
Capabilities); none talks to the device except ``trtexec``, which is handed a function running one
command there. A check that does not apply returns None.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from .bundles import Bundle
from .results import Check


def parity(bundle: Bundle, result: dict) -> Check:
    """The device's logits against the bundle's shipped reference, judged by the recipe's thresholds."""
    from ..recipes import get_recipe

    metrics = result.get("parity")
    if not metrics:
        return Check("parity", "skipped", "the bundle ships no parity_reference.npz")
    failures = get_recipe(bundle.manifest["recipe"]).thresholds_for(bundle.spec).failures(metrics)
    host = (bundle.manifest.get("parity") or {}).get("metrics", {})
    summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("max_abs_err", "top1_agreement", "cosine_min")
                        if isinstance(metrics.get(k), (int, float)))
    return Check("parity", "failed" if failures else "passed",
                 ("; ".join(failures) + f" ({summary})") if failures else summary,
                 data={"device": metrics, "host": {k: host.get(k) for k in metrics if k in host}})


def budget(result: dict, target, overrides: dict, capabilities) -> Check:
    """The latency figures against the target's budgets, as tightened or relaxed by the device's ``overrides``.

    Skipped when the transport's timings are not the device's own (``capabilities.device_timings``).
    """
    budgets = dataclasses.replace(target.budgets, **overrides)
    lat = result["latency"]
    if not capabilities.device_timings:
        return Check("budget", "skipped", capabilities.timings_note)
    if "decode_tok_s" not in lat:
        return Check("budget", "skipped", "budgets apply to causal LMs (decode tok/s, TTFT)")
    set_budgets = {k: v for k, v in dataclasses.asdict(budgets).items() if v is not None}
    if not set_budgets:
        return Check("budget", "skipped", f"target {target.name} sets no budgets")
    failures = budgets.failures(lat)
    figures = (f"decode {lat['decode_tok_s']:.1f} tok/s, TTFT {lat['ttft_ms']:.1f} ms, "
               f"peak RSS {lat.get('peak_rss_mb', 0):.0f} MB")
    return Check("budget", "failed" if failures else "passed",
                 (f"missed the {target.name} budget: " + "; ".join(failures)) if failures
                 else f"within the {target.name} budget ({figures})",
                 data={"budgets": set_budgets, "figures": figures})


def providers(result: dict, profile) -> Check | None:
    """The ONNX Runtime execution providers the sessions really used include the profile's required ones.

    None when the run asked for no providers (the runner then reports none).
    """
    info = result.get("ort_providers")
    if not info:
        return None
    used = sorted({p for session in info["used"] for p in session})
    missing = [p for p in profile.required_providers if p not in used]
    if missing:
        return Check("providers", "failed",
                     f"onnxruntime ran on {', '.join(used)}, not {', '.join(missing)} "
                     f"(available: {', '.join(info['available'])}); {profile.runtime_pip_hint or ''}", data=info)
    return Check("providers", "passed", f"sessions used {', '.join(used)}", data=info)


def trtexec(bundle: Bundle, dest: str, probe: dict, profile, run_on_device: Callable) -> Check | None:
    """Time the deployed ``.onnx`` with the profile's trtexec, when the target declares one.

    ``run_on_device(argv)`` runs one command on the device and returns its Result. Skipped when
    the probe found no trtexec there; None when the target (or a non-ONNX bundle) has nothing to time.
    """
    hook = profile.trtexec
    if hook is None or bundle.format != "onnx":
        return None
    tool = probe.get("trtexec")
    if not tool:
        return Check("trtexec", "skipped", "trtexec is not installed on the device "
                     "(JetPack: apt-get install tensorrt, /usr/src/tensorrt/bin/trtexec)")
    argv = hook.argv(tool, f"{dest}/bundle/{bundle.spec['artifact']}", bundle.spec,
                     len(bundle.spec.get("latency_prompt_ids") or [64]))
    t0 = time.perf_counter()
    res = run_on_device(argv)
    output = res.stdout + res.stderr
    figures = hook.parse(output)
    ok = res.returncode == 0 and figures
    tail = [ln for ln in output.splitlines() if ln.strip()][-1:] or ["no output"]
    return Check("trtexec", "passed" if ok else "failed",
                 (f"decode step {figures.get('gpu_compute_ms', {}).get('median', float('nan')):.3f} ms "
                  "(GPU compute median)") if ok else f"trtexec failed: {tail[0][:300]}",
                 time.perf_counter() - t0, figures)
