"""ExecuTorch's LLM runner: ``TextLLMRunner``, the Python binding of the C++ runner behind ``llama_main``
and the ExecuTorch Android / iOS demo apps, over the bundle's .pte and tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from . import FieldRuntime, GreedyRun, register


def _generate(bundle_dir: Path, manifest: dict, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    # The custom ops (llama::custom_sdpa, update_cache) our pte uses are registered by this import;
    # without it the runner fails with "Missing operator llama::custom_sdpa.out".
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from tokenizers import Tokenizer

    from ..runtime import read_spec

    spec = read_spec(bundle_dir)
    tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    # The runner takes text and tokenizes it itself: feed the prompt's text, which must encode back to
    # the same ids, else the comparison would not be of the same prompt.
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if tokenizer.encode(prompt_text, add_special_tokens=False).ids != list(prompt_ids):
        raise ValueError("the greedy prompt does not survive decode + encode with tokenizer.json, so the "
                         "runner cannot be given the same tokens")
    runner = TextLLMRunner(str(bundle_dir / spec["artifact"]), str(bundle_dir / "tokenizer.json"))
    config = GenerationConfig()
    config.max_new_tokens, config.temperature = n_tokens, 0.0  # temperature 0: argmax
    config.num_bos = config.num_eos = 0  # the prompt carries its own special tokens
    config.echo = False
    pieces, stats = [], []
    runner.generate(prompt_text, config, token_callback=pieces.append, stats_callback=stats.append)
    speed = None
    if stats:
        s = stats[-1]
        decode_ms = s.inference_end_ms - s.first_token_ms
        if s.num_generated_tokens > 1 and decode_ms > 0:
            speed = (s.num_generated_tokens - 1) * s.SCALING_FACTOR_UNITS_PER_SECOND / decode_ms
    return GreedyRun(tokens=[], decode_tokens_per_s=speed, pieces=pieces)


register(FieldRuntime(name="executorch TextLLMRunner", formats=("pte",), distribution="executorch",
                      module="executorch.extension.llm.runner", generate=_generate, order=10))
