"""Our own runner (exporter.runtime): the row every other runtime's greedy tokens are compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import open_runner
from . import FieldRuntime, GreedyRun, register, timed_greedy


def _generate(bundle_dir: Path, manifest: dict, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    runner = open_runner(bundle_dir, verify_files=False)  # verify() is run on a checked bundle

    def step(previous: int | None) -> int:
        logits = runner.forward(prompt_ids if previous is None else [previous])
        return int(np.argmax(logits[-1]))

    return timed_greedy(step, n_tokens)


register(FieldRuntime(name="slm-export", formats=("onnx", "tflite", "pte"), distribution="slm-export",
                      module="exporter", generate=_generate, is_ours=True, order=0))
