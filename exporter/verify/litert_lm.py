"""LiteRT-LM (litert-lm-api): the bundle's ``model.litertlm`` run by LiteRT's own LLM runtime.

litert-lm-api 0.18.1 has no token-level API: a session prefills text (tokenized by the HF tokenizer
inside the .litertlm) and streams text back, one callback per decode step. So, in the runtime's own
terms:

  * the prompt ids become text with the engine's own ``detokenize``, and the engine's ``tokenize`` of
    that text must give the ids back (else the run is refused, naming the first difference: the
    runtime would see another prompt). A leading BOS is left to LiteRT-LM, which prepends its
    ``start_token`` itself;
  * each streamed chunk is mapped back to the token id whose ``detokenize`` is that text (a table
    over the vocabulary, built with the engine's tokenizer). A chunk that is no single token's text
    (several tokens of one UTF-8 character) is re-tokenized; the text of several ids (Gemma has more than
    one "," and ".") becomes the id ``tokenize`` makes of it, else the smallest; the note counts them;
  * sampling is greedy (top-p sampling with top_k = 1), activations float32, no prompt template.

LiteRT-LM ends generation at the metadata's stop tokens (the run says so: ``GreedyRun.stopped``).
Decode speed is measured as ``timed_greedy`` does it: the chunks after the first over the time from the
first to the last (LiteRT-LM's own benchmark figure for the turn is in the note).
"""

from __future__ import annotations

import queue
import tempfile
import time
from pathlib import Path

from ..runtime.files import bundle_path
from . import FieldRuntime, GreedyRun, register

LITERTLM_FILE = "model.litertlm"


def _applies(manifest: dict) -> str | None:
    files = manifest.get("files") or {}
    names = files.keys() if isinstance(files, dict) else [f.get("path") for f in files if isinstance(f, dict)]
    if LITERTLM_FILE not in names:
        return (f"the bundle has no {LITERTLM_FILE} (exported before LiteRT-LM bundles, or its model folder "
                "has no tokenizer.json); re-export with --format tflite")
    return None


def _engine(path: Path, threads: int | None, cache_dir: str):
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    return litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(thread_count=threads), cache_dir=cache_dir,
                            activation_data_type=litert_lm.ActivationDataType.FLOAT32, enable_benchmark=True)


def _greedy_session(engine, max_output_tokens: int):
    """A session without prompt template, greedy, ``max_output_tokens`` long.

    LiteRT-LM 0.18.1's CPU sampler answers GREEDY and TOP_K with "Sampler type: N not implemented yet";
    TOP_P with top_k = 1 keeps one candidate, the argmax (litert-lm-api's own SamplerConfig does the same).
    """
    from litert_lm._ffi import SamplerType
    from litert_lm.session import Session

    lib = engine._lib
    config = lib.litert_lm_session_config_create()
    if not config:
        raise RuntimeError("litert_lm_session_config_create failed")
    try:
        lib.litert_lm_session_config_set_apply_prompt_template(config, False)
        params = lib.litert_lm_sampler_params_create(SamplerType.TOP_P)
        try:
            lib.litert_lm_sampler_params_set_top_k(params, 1)  # one candidate left: the argmax
            lib.litert_lm_sampler_params_set_top_p(params, 1.0)
            lib.litert_lm_sampler_params_set_temperature(params, 1.0)
            lib.litert_lm_sampler_params_set_seed(params, 0)
            lib.litert_lm_session_config_set_sampler_params(config, params)
        finally:
            lib.litert_lm_sampler_params_delete(params)
        lib.litert_lm_session_config_set_max_output_tokens(config, int(max_output_tokens))
        ptr = lib.litert_lm_engine_create_session(engine._engine_ptr, config)
    finally:
        lib.litert_lm_session_config_delete(config)
    if not ptr:
        raise RuntimeError("LiteRT-LM could not create a session")
    return Session(lib, ptr, engine=engine)


def _stream(session) -> list[tuple[float, str]]:
    """(arrival time, text) of every decode step's chunk, empty ones included (litert-lm-api's
    ``run_decode_async`` drops those)."""
    from litert_lm._ffi import STREAM_CALLBACK_TYPE

    lib, chunks = session._lib, queue.Queue()

    def callback(_data, chunk_ptr):
        error = lib.litert_lm_stream_chunk_get_error(chunk_ptr)
        if error:
            chunks.put(RuntimeError(error.decode("utf-8", "replace")))
            return
        text = lib.litert_lm_stream_chunk_get_text(chunk_ptr)
        chunks.put((time.perf_counter(), text.decode("utf-8", "replace") if text else "",
                    bool(lib.litert_lm_stream_chunk_is_final(chunk_ptr))))

    c_callback = STREAM_CALLBACK_TYPE(callback)
    session._current_callback = c_callback  # kept alive while the C++ thread may call it
    if lib.litert_lm_session_run_decode_async(session._ptr, c_callback, None) != 0:
        raise RuntimeError("litert_lm_session_run_decode_async failed")
    out = []
    while True:
        item = chunks.get(timeout=600)
        if isinstance(item, Exception):
            if "Max number of tokens reached" in str(item) or "CANCELLED" in str(item):
                break
            raise item
        at, text, final = item
        if text or not final:
            out.append((at, text))
        if final:
            break
    return out


def _vocabulary(engine, size: int) -> dict[str, list[int]]:
    """Text -> ids of every token of the engine's tokenizer (its own detokenize, one id at a time)."""
    table: dict[str, list[int]] = {}
    for i in range(size):
        try:
            text = engine.detokenize([i])
        except RuntimeError:
            continue
        table.setdefault(text, []).append(i)
    return table


def _ids(chunks: list[str], table: dict[str, list[int]], engine) -> tuple[list[int], int]:
    """Token ids of the streamed chunks, and how many chunks needed a guess (see the module doc)."""
    ids, guessed = [], 0
    for text in chunks:
        candidates = table.get(text)
        if candidates and len(candidates) == 1:
            ids.append(candidates[0])
            continue
        guessed += 1
        if candidates:  # several ids with this text: the one the tokenizer itself makes of it, else the smallest
            canonical = engine.tokenize(text)
            ids.append(canonical[0] if len(canonical) == 1 and canonical[0] in candidates else min(candidates))
        else:
            ids.extend(engine.tokenize(text))
    return ids, guessed


def _prompt_text(engine, prompt_ids: list[int]) -> str:
    """The text LiteRT-LM tokenizes into ``prompt_ids`` (after its own start token, if it has one)."""
    bos = engine.bos_token_id
    ids = prompt_ids[1:] if bos is not None and prompt_ids and prompt_ids[0] == bos else list(prompt_ids)
    text = engine.detokenize(ids)
    again = engine.tokenize(text)
    if again != ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
        raise RuntimeError(f"LiteRT-LM takes text, and its tokenizer does not give the prompt's ids back from it "
                           f"(token {at}: {ids[at:at + 3]} -> {again[at:at + 3]}); this prompt cannot be fed as ids")
    return text


def generate(bundle_dir: Path, prompt_ids: list[int], n_tokens: int, vocab_size: int,
             threads: int | None = None) -> GreedyRun:
    """Greedy ``n_tokens`` after ``prompt_ids`` through LiteRT-LM, on the bundle's .litertlm."""
    path = bundle_path(Path(bundle_dir), LITERTLM_FILE, "LiteRT-LM model")
    with tempfile.TemporaryDirectory(prefix="litert-lm-") as cache:
        engine = _engine(path, threads, cache)
        try:
            text = _prompt_text(engine, prompt_ids)
            table = _vocabulary(engine, vocab_size)
            session = _greedy_session(engine, n_tokens)
            try:
                session.run_prefill([text])
                stream = _stream(session)
                try:
                    info = session.get_benchmark_info()
                except RuntimeError:
                    info = None
            finally:
                session.close()
            tokens, guessed = _ids([t for _, t in stream], table, engine)
            stop_tokens = tuple(ids[0] for ids in engine.eos_token_ids if len(ids) == 1)
        finally:
            engine.close()
    tokens = tokens[:n_tokens]
    # timed_greedy's definition: the tokens after the first, over the time from the first to the last.
    speed = None
    if len(stream) > 1 and stream[-1][0] > stream[0][0]:
        speed = (len(stream) - 1) / (stream[-1][0] - stream[0][0])
    own = getattr(info, "last_decode_tokens_per_second", None) if info is not None else None
    notes = [f"LiteRT-LM's own benchmark: {own:.1f} decode tok/s"] if own else []
    if guessed:
        notes.append(f"{guessed} streamed chunk(s) were not exactly one token's text; their ids were recovered "
                     "with tokenize / the smallest id")
    stopped = len(tokens) < n_tokens
    if stopped:
        notes.append(f"stopped at a stop token after {len(tokens)} tokens")
    return GreedyRun(tokens, speed or None, "; ".join(notes), stopped=stopped, stop_tokens=stop_tokens)


def _generate(bundle_dir: Path, manifest: dict, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    from ..runtime.base import read_spec

    spec = read_spec(Path(bundle_dir))
    return generate(bundle_dir, prompt_ids, n_tokens, int(spec["vocab_size"]))


register(FieldRuntime(name="litert-lm", formats=("tflite",), distribution="litert-lm-api", module="litert_lm",
                      generate=_generate, install="pip install litert-lm-api==0.18.1", applies=_applies))
