"""ExecuTorch lowering time: slm-export's XNNPACK lowering against ExecuTorch's plain one, same run.

    python benchmarks/pte_lowering.py [--layers 4] [--recipe int4-weight] [--rounds 2] [--model PATH]

Takes the first ``--layers`` decoder layers of the model (default: the embedded SmolLM2-135M), so one
round takes a minute or two instead of ten, and builds the ``.pte`` two ways, interleaved (A B, B A, ...):

* ``plain``: ExecuTorch's ``to_edge_transform_and_lower`` with XNNPACK as ExecuTorch ships it (every
  pass on every graph, three decompositions; transformers' RMSNorm, rotary ``rotate_half`` and
  symbolic views);
* ``slm-export``: the same plus ``exporter/formats/pte_passes.py`` and ``pte_layers.py``.

Prints build seconds (median, min..max), the ratio, XNNPACK delegate counts, and each program's parity
with the PyTorch float model on a 64-token window of the evaluation text (max |logit error|, top-1
agreement): the rewrites must not cost accuracy. Machines here are noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def plain_executorch():
    """Switch slm-export's lowering rewrites off (what ExecuTorch alone does)."""
    from exporter.formats import pte_layers, pte_passes

    saved = (pte_passes.skip_inapplicable_passes, pte_passes.static_view_shapes, pte_passes.decompose_once,
             pte_layers.supported)
    pte_passes.skip_inapplicable_passes = contextlib.nullcontext
    pte_passes.static_view_shapes = lambda ep: 0
    pte_passes.decompose_once = lambda partitioner: partitioner
    pte_layers.supported = lambda config: False
    try:
        yield
    finally:
        (pte_passes.skip_inapplicable_passes, pte_passes.static_view_shapes, pte_passes.decompose_once,
         pte_layers.supported) = saved


def build(loaded, recipe: str, out: Path) -> tuple[float, dict]:
    from exporter.formats import ExportOptions, get_format

    t0 = time.perf_counter()
    artifact = get_format("pte").build(loaded, recipe, ExportOptions(max_context=512), out)
    seconds = time.perf_counter() - t0
    (out / "runtime.json").write_text(json.dumps(artifact.spec))
    return seconds, artifact.spec


def delegates(path: Path) -> int:
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes())
    return len(getattr(program, "program", program).execution_plan[0].delegates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--recipe", default="int4-weight")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from exporter.loading import load_model
    from exporter.parity import reference_logits
    from exporter.runtime import open_runner
    from exporter.runtime.metrics import logit_metrics
    from exporter.texts import eval_text, token_windows

    loaded = load_model(args.model)
    model = loaded.model
    layers = model.model.layers[: args.layers]
    model.model.layers = layers
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: len(layers)]

    times = {"plain": [], "slm-export": []}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["plain", "slm-export"] if r % 2 == 0 else ["slm-export", "plain"]
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                with plain_executorch() if name == "plain" else contextlib.nullcontext():
                    seconds, spec = build(loaded, args.recipe, out)
                times[name].append(seconds)
                outputs[name] = (out, spec)
                print(f"round {r + 1}: {name:10s} {seconds:6.1f} s", flush=True)
        ids = token_windows(loaded.tokenizer, eval_text(), 64, 1)[0]
        reference = reference_logits(model, ids)
        parity = {}
        for name, (out, spec) in outputs.items():
            runner = open_runner(out, spec, verify_files=False)
            runner.reset()
            parity[name] = logit_metrics(reference, runner.forward(ids), np.asarray(ids[1:]))
        counts = {name: delegates(out / "model.pte") for name, (out, _) in outputs.items()}
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\n{loaded.config.model_type}, first {len(layers)} layers, {args.recipe}, {args.rounds} rounds")
    for name in times:
        print(f"  {name:10s} build {med[name]:6.1f} s ({min(times[name]):.1f}..{max(times[name]):.1f}), "
              f"{counts[name]} XNNPACK delegates, vs PyTorch: max |logit err| {parity[name]['max_abs_err']:.3g}, "
              f"top-1 {parity[name]['top1_agreement']:.3f}")
    print(f"  slm-export / plain: {med['slm-export'] / med['plain']:.2f}x the build time")


if __name__ == "__main__":
    main()
