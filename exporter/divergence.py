"""Where an artifact's quantization loses the model: ``slm-export inspect BUNDLE``.

For a causal-LM bundle, on the parity gate's English windows, with the bundle's own quantization
simulated layer by layer in PyTorch (``exporter.simulate``, each format's ``simulated_schemes``):

- **drift**: every layer quantized, how far the hidden state after each decoder layer is from the
  reference's (relative error ||h_q - h|| / ||h|| and cosine, mean over positions);
- **sensitivity**: one unit at a time quantized (a layer's attention, a layer's MLP, the embedding,
  the LM head), the rest float: what that unit alone costs in top-1 agreement, perplexity and KL
  divergence from the reference's next-token distribution;
- **fidelity**: the simulation's final logits against the artifact's own (run in its runtime on the
  same windows), so a reader can see how far to trust the two figures above.

This is what ExecuTorch's Inspector does for one format (intermediate outputs of a delegated graph),
for all three, by simulation: none of the runtimes exposes a delegated layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SlmExportError
from .progress import task

ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down")


@dataclass(frozen=True)
class Unit:
    """A group of layers whose quantization is measured together: one layer's attention or MLP, or a
    layer outside the decoder layers (embedding, LM head)."""

    name: str  # "layer 3 mlp", "lm_head"
    layer: int | None
    part: str  # "attention" | "mlp" | "embed" | "lm_head" | another role
    modules: tuple[str, ...]


def units(family, schemes: dict) -> list[Unit]:
    """The simulated layers of ``schemes`` grouped into units, in model order."""
    groups: dict[tuple, list[str]] = {}
    for name in schemes:
        role, layer = family.role_of(name), family.layer_of(name)
        part = ("attention" if role in ATTENTION_ROLES else "mlp" if role in MLP_ROLES else role or name)
        groups.setdefault((layer, part), []).append(name)

    def order(key):
        layer, part = key
        outside = {"embed": -1}.get(part, 10 ** 6)  # the embedding first, the LM head last
        return (outside if layer is None else layer, part)

    return [Unit(f"layer {layer} {part}" if layer is not None else part, layer, part, tuple(groups[(layer, part)]))
            for layer, part in sorted(groups, key=order)]


def _scores(refs: list[np.ndarray], outs: list[np.ndarray], windows: list[list[int]]) -> dict:
    """top-1 agreement, perplexity change and mean KL(ref || out) over all windows' positions.

    Not ``runtime.metrics.LogitStats``: it has no KL, and its top-5 set (a partition of the whole vocabulary
    at every position) would cost, over the ~60 units of a 30-layer model and a 49k-262k vocabulary,
    minutes for a figure not shown.
    """
    from .runtime.metrics import log_softmax

    agree = kl = nll_ref = nll_out = 0.0
    positions = scored = 0
    for ref, out, ids in zip(refs, outs, windows):
        lr, lo = log_softmax(ref), log_softmax(out)
        agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
        kl += float((np.exp(lr) * (lr - lo)).sum(-1).sum())
        nxt = np.asarray(ids[1:])
        idx = np.arange(len(nxt))
        nll_ref -= float(lr[idx, nxt].sum())
        nll_out -= float(lo[idx, nxt].sum())
        positions += len(ref)
        scored += len(nxt)
    return {"top1_agreement": agree / positions, "kl": kl / positions,
            "ppl_rel_change": float(np.exp((nll_out - nll_ref) / scored) - 1.0)}


def _drift(ref_hidden: list[list], sim_hidden: list[list]) -> list[dict]:
    """Per hidden-state index (0: embeddings, i: after decoder layer i-1): relative error and cosine."""
    import torch

    rows = []
    for i in range(len(ref_hidden[0])):
        h = torch.cat([w[i] for w in ref_hidden])
        q = torch.cat([w[i] for w in sim_hidden])
        rel = ((q - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).mean().item()
        cos = torch.nn.functional.cosine_similarity(q, h, dim=-1).mean().item()
        rows.append({"after": "embeddings" if i == 0 else f"layer {i - 1}", "layer": i - 1 if i else None,
                     "rel_err": round(rel, 5), "cosine": round(cos, 6)})
    return rows


# Every format's ``simulated_schemes`` covers these; calibrated activation ranges (int8-static, int8-full)
# are not simulated.
SIMULATED_RECIPES = ("fp32", "fp16", "int8-dynamic", "int4-weight")


def check_simulated(fmt: str, recipe: str) -> None:
    """Refuse a recipe inspect cannot simulate (before an export spends minutes on it with --inspect)."""
    if recipe not in SIMULATED_RECIPES:
        raise SlmExportError(f"inspect cannot simulate this bundle: {fmt} {recipe} (calibrated activation ranges)",
                             hint=f"inspect covers {', '.join(SIMULATED_RECIPES)} bundles")


def simulated_schemes(fmt: str, recipe: str, loaded, group_size: int, spec: dict) -> dict:
    """The format's own ``simulated_schemes`` (in its recipe module), under the mixed-precision rules the
    artifact was built with (runtime.json "plan_overrides"); a recipe it cannot simulate is refused."""
    import importlib

    from .recipes import Rule, overriding

    check_simulated(fmt, recipe)
    module = importlib.import_module(f"exporter.formats.{fmt}_quant")
    with overriding(Rule.from_dict(d) for d in spec.get("plan_overrides", ())):
        return module.simulated_schemes(recipe, loaded, group_size, spec)


def analyse(loaded, schemes: dict, windows: list[list[int]], runner=None,
            progress: Callable[[str], None] = lambda m: None) -> dict:
    """Drift, per-unit sensitivity and (with ``runner``, the artifact) fidelity of ``schemes`` on ``windows``."""
    from .parity import artifact_logits
    from .simulate import Simulation

    sim = Simulation(loaded.model, schemes)
    found = units(loaded.family, sim.schemes)
    with task(progress, "inspect: the reference and the fully quantized simulation", total=2 * len(windows)) as counted:
        refs, ref_hidden, full, full_hidden = [], [], [], []
        for ids in windows:
            logits, hidden = sim.forward(ids, hidden_states=True)
            refs.append(logits)
            ref_hidden.append(hidden)
            counted.advance()
        sim.enable()
        for ids in windows:
            logits, hidden = sim.forward(ids, hidden_states=True)
            full.append(logits)
            full_hidden.append(hidden)
            counted.advance()
    result = {"windows": len(windows), "tokens": sum(len(w) for w in windows),
              "layers": {n: s.describe() for n, s in sim.schemes.items()},
              "simulated": _scores(refs, full, windows), "drift": _drift(ref_hidden, full_hidden)}
    del ref_hidden, full_hidden
    if runner is not None:
        with task(progress, "inspect: the artifact in its runtime on the same windows", total=len(windows)) as counted:
            arts = []
            for ids in windows:
                arts.append(artifact_logits(runner, ids))
                counted.advance()
        result["fidelity"] = fidelity(refs, full, arts, windows, result["simulated"])
    rows = []
    with task(progress, f"inspect: {len(found)} units quantized one at a time", total=len(found)) as counted:
        for unit in found:
            sim.enable(unit.modules)
            outs = [sim.forward(ids)[0] for ids in windows]
            scores = _scores(refs, outs, windows)
            rows.append({"unit": unit.name, "layer": unit.layer, "part": unit.part, "modules": list(unit.modules),
                         "scheme": sorted({sim.schemes[m].describe() for m in unit.modules}),
                         **{k: float(f"{v:.6g}") for k, v in scores.items()}})
            counted.advance()
    sim.disable()
    result["sensitivity"] = rows
    return result


def fidelity(refs, sims, arts, windows, simulated: dict | None = None) -> dict:
    """How well the simulation stands for the artifact: both against the reference, and each other
    (``simulated``: the simulation's ``_scores``, when the caller has them already)."""
    from .runtime.metrics import logit_metrics

    sim_vs_art = logit_metrics(np.concatenate(arts), np.concatenate(sims))
    ref_vs_art = logit_metrics(np.concatenate(refs), np.concatenate(arts))
    return {"artifact": _scores(refs, arts, windows), "simulation": simulated or _scores(refs, sims, windows),
            "simulation_vs_artifact": {"top1_agreement": sim_vs_art["top1_agreement"],
                                       "mean_abs_err": sim_vs_art["mean_abs_err"]},
            "reference_vs_artifact": {"top1_agreement": ref_vs_art["top1_agreement"],
                                      "mean_abs_err": ref_vs_art["mean_abs_err"]}}


def model_spec(manifest: dict) -> str:
    """What to load as the bundle's reference: its embedded model's name, or the path it came from."""
    model = manifest.get("model") or {}
    if model.get("embedded"):
        return model["embedded"]
    source = model.get("source")
    if not source or not Path(source).exists():
        raise SlmExportError(f"the model this bundle was exported from ({source or 'not recorded'}) is not here",
                             hint="pass --model PATH (the same model the bundle was exported from)")
    return source


def inspect_bundle(bundle_dir: Path, model: str | None = None, windows: int = 3, window: int = 128,
                   run_artifact: bool = True, progress: Callable[[str], None] = lambda m: None) -> dict:
    """``analyse`` a bundle against the model it came from (``model`` overrides the manifest's)."""
    from .loading import load_model
    from .runtime.base import read_spec, verify

    manifest = verify(bundle_dir)  # a tampered bundle is refused before anything runs
    spec = read_spec(bundle_dir)
    if spec.get("kind") != "causal-lm":  # before loading anything
        raise SlmExportError(f"inspect covers causal LMs; {bundle_dir} holds a {spec.get('kind')} model")
    loaded = load_model(model or model_spec(manifest))
    want, got = (manifest.get("model") or {}).get("source_sha256"), loaded.identity.get("source_sha256")
    if want and got and want != got:
        raise SlmExportError(f"the model loaded ({loaded.identity.get('source')}) is not the one {bundle_dir} "
                             "was exported from (its sha256 differs)", hint="pass --model with the bundle's model")
    return inspect_loaded(loaded, bundle_dir, spec, manifest["recipe"], windows, window, run_artifact, progress)


def inspect_loaded(loaded, bundle_dir: Path, spec: dict, recipe: str, windows: int = 3, window: int = 128,
                   run_artifact: bool = True, progress: Callable[[str], None] = lambda m: None) -> dict:
    """``analyse`` the artifact in ``bundle_dir`` (runtime.json ``spec``) against ``loaded``, its float model:
    ``slm-export inspect`` on a written bundle, ``--inspect`` on the staged one during an export."""
    from .runtime.base import open_runner
    from .texts import eval_text, token_windows

    if loaded.kind != "causal-lm" or spec.get("kind", "causal-lm") != "causal-lm":
        raise SlmExportError(f"inspect covers causal LMs; this is a {spec.get('kind') or loaded.kind} model")
    schemes = simulated_schemes(spec["format"], recipe, loaded, int(spec.get("group_size") or 32), spec)
    if spec.get("max_context"):
        window = min(window, int(spec["max_context"]))
    ids = token_windows(loaded.tokenizer, eval_text(), window, windows)
    runner = open_runner(bundle_dir, spec, verify_files=False) if run_artifact else None
    result = analyse(loaded, schemes, ids, runner, progress)
    result.update({"bundle": str(bundle_dir), "format": spec["format"], "recipe": recipe, "window": window,
                   "model": loaded.identity.get("embedded") or loaded.identity.get("source")})
    return result


def most_sensitive(result: dict, n: int = 10) -> list[dict]:
    """The ``n`` units whose quantization alone costs the most (KL from the reference, highest first)."""
    return sorted(result["sensitivity"], key=lambda r: -r["kl"])[:n]


# ---------------------------------------------------------------- report


def sensitivity_plot(result: dict) -> str | None:
    """Per decoder layer: KL of its attention and MLP quantized alone (bars), and the full simulation's
    hidden-state drift after it (line); a base64 PNG."""
    from .htmlpage import figure_png, pyplot

    rows = [r for r in result["sensitivity"] if r["layer"] is not None]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    layers = sorted({r["layer"] for r in rows})
    for offset, part in ((-0.2, "attention"), (0.2, "mlp")):
        kl = {r["layer"]: r["kl"] for r in rows if r["part"] == part}
        ax.bar([x + offset for x in layers], [kl.get(x, 0.0) for x in layers], width=0.4, label=f"{part} alone: KL")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("KL(reference || quantized), nats/token")
    drift = [d for d in result["drift"] if d["layer"] is not None]
    twin = ax.twinx()
    twin.plot([d["layer"] for d in drift], [d["rel_err"] for d in drift], color="k", marker=".",
              label="all quantized: hidden-state relative error")
    twin.set_ylabel("relative error after the layer")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(f"{result['format']} {result['recipe']}: per-layer sensitivity and drift")
    return figure_png(fig)


def html_section(result: dict) -> str:
    """The inspect figures as HTML (a section of report.html, or a page of its own)."""
    from .htmlpage import esc, img

    out = ["<h2>Per-layer divergence (simulated quantization)</h2>",
           f"<p>{result['windows']} windows of {result['window']} tokens. Each unit quantized alone, the rest float; "
           "the drift line has every layer quantized.</p>"]
    png = sensitivity_plot(result)
    if png:
        out.append(img(png, "per-layer sensitivity"))
    fid = result.get("fidelity")
    if fid:
        out.append(f"<p>Simulation vs the artifact: top-1 agreement {fid['simulation_vs_artifact']['top1_agreement']:.3f}; "
                   f"artifact vs reference top-1 {fid['artifact']['top1_agreement']:.3f}, ppl "
                   f"{fid['artifact']['ppl_rel_change']:+.2%}; simulation top-1 {fid['simulation']['top1_agreement']:.3f}, "
                   f"ppl {fid['simulation']['ppl_rel_change']:+.2%}.</p>")
    out.append("<table><tr><th>unit</th><th>quantization</th><th>top-1</th><th>ppl change</th><th>KL</th></tr>")
    for r in most_sensitive(result, 12):
        out.append(f"<tr><td>{esc(r['unit'])}</td><td>{esc(', '.join(r['scheme']))}</td><td>{r['top1_agreement']:.3f}</td>"
                   f"<td>{r['ppl_rel_change']:+.2%}</td><td>{r['kl']:.4f}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def html_page(result: dict) -> str:
    """inspect.html: the section above as a page of its own."""
    from .htmlpage import esc, page_head

    return (page_head(f"slm-export inspect: {result['bundle']}", "60em")
            + f"<h1>inspect {esc(result['bundle'])}</h1><p>{esc(result['format'])} / {esc(result['recipe'])}, "
              f"model {esc(result['model'])}</p>\n" + html_section(result))
