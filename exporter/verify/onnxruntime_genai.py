"""onnxruntime-genai: Microsoft's generation loop over onnxruntime (the runtime of its model builder,
Foundry Local and the ORT mobile LLM samples), reading the bundle's genai_config.json."""

from __future__ import annotations

from pathlib import Path

from ..formats.onnx_genai import GENAI_CONFIG
from . import FieldRuntime, GreedyRun, register, timed_greedy


def _generate(bundle_dir: Path, manifest: dict, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    import onnxruntime_genai as og

    model = og.Model(str(bundle_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n_tokens, do_sample=False, top_k=1)
    generator = og.Generator(model, params)

    def step(previous: int | None) -> int:
        if previous is None:
            generator.append_tokens(list(prompt_ids))  # the prefill
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0])

    return timed_greedy(step, n_tokens)


def _applies(manifest: dict) -> str | None:
    if GENAI_CONFIG not in manifest.get("files", {}):
        return f"the bundle has no {GENAI_CONFIG} (exported before slm-export wrote it: export again)"
    return None


register(FieldRuntime(name="onnxruntime-genai", formats=("onnx",), distribution="onnxruntime-genai",
                      module="onnxruntime_genai", generate=_generate, applies=_applies, order=10))
