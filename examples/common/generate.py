"""Streaming generation: prefill (reusing the cached prefix), decode with the KV cache, sample, stop."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from .bundle import Bundle
from .detok import StopStringFilter, StreamDecoder
from .kv import KVSession
from .sampling import Sampler, SamplingConfig


class Generation:
    """An iterator of text pieces; after it ends, ``text``, ``token_ids``, ``stop_reason`` and timings are set.

    ``stop_reason`` is one of "eos", "stop_string", "max_new_tokens", "context" (window full).
    """

    def __init__(self, bundle: Bundle, session: KVSession, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: SamplingConfig | None, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.bundle, self.session = bundle, session
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling)
        self.stop_ids = set(bundle.eos_ids) | {int(t) for t in stop_ids}
        self.stop_strings = list(stop_strings)
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.prompt_truncated = 0
        self.ttft_s = self.decode_s = 0.0
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def run(self) -> str:
        """Consume the stream; the whole text."""
        for _ in self:
            pass
        return self.text

    def _run(self) -> Iterator[str]:
        window = self.bundle.context
        prompt = self.prompt_ids
        if len(prompt) >= window:  # keep the most recent tokens and room for at least one new one
            self.prompt_truncated = len(prompt) - (window - 1)
            prompt = prompt[self.prompt_truncated:]
        if not prompt:
            raise ValueError("generation needs a non-empty prompt")
        t0 = time.perf_counter()
        logits = self.session.feed(prompt)
        decoder = StreamDecoder(self.bundle.tokenizer)
        stops = StopStringFilter(self.stop_strings)
        t1 = None
        while True:
            token = self.sampler(logits, self.token_ids)
            if t1 is None:
                t1 = time.perf_counter()
                self.ttft_s = t1 - t0
            if token in self.stop_ids:
                self.stop_reason = "eos"
                break
            self.token_ids.append(token)
            piece = stops.push(decoder.push(token))
            if piece:
                self.text += piece
                yield piece
            if stops.stopped:
                self.stop_reason = "stop_string"
                break
            if len(self.token_ids) >= self.max_new_tokens:
                self.stop_reason = "max_new_tokens"
                break
            if len(self.session.tokens) + 1 > window:
                self.stop_reason = "context"
                break
            logits = self.session.append(token)
        if not stops.stopped:
            rest = stops.push(decoder.flush()) + stops.flush()
            if stops.stopped:
                self.stop_reason = "stop_string"
            if rest:
                self.text += rest
                yield rest
        self.decode_s = time.perf_counter() - (t1 or t0)

    @property
    def decode_tok_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if len(self.token_ids) > 1 and self.decode_s > 0 else 0.0


def generate(bundle: Bundle, prompt: str | Sequence[int], max_new_tokens: int = 64,
             sampling: SamplingConfig | None = None, stop_strings: Sequence[str] = (),
             session: KVSession | None = None) -> Generation:
    """Stream a continuation of ``prompt`` (text or token ids). Pass a ``session`` to reuse its cache."""
    ids = bundle.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return Generation(bundle, session or KVSession(bundle.runner), ids, max_new_tokens, sampling, stop_strings)
