"""Chat with the bundle's chat template, streamed replies, memory kept within the context window."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from examples.common import AppError, Bundle, KVSession, SamplingConfig, generate

DEFAULT_SAMPLING = SamplingConfig(temperature=0.3, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=0)
# The user's name, said and asked. SmolLM2-135M does not answer "What is my name?" from its history,
# even though the history is in its prompt and cache (checked against a fresh prefill, and PyTorch
# fp32 answers the same way), so the chat remembers this one fact itself.
NAME_SAID = re.compile(r"\b(?:my name is|my name's|call me|i am called|i'm called)\s+([A-Z][\w'-]*)", re.IGNORECASE)
NAME_ASKED = re.compile(r"\b(?:what(?:'s| is) my name|do you (?:know|remember) my name|who am i)\b", re.IGNORECASE)


@dataclass
class Recalled:
    """Stands in for a Generation when a reply comes from the chat's memory, not the model."""

    text: str
    token_ids: list = field(default_factory=list)
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    stop_reason: str = "memory"


class Chat:
    """A conversation: ``send`` streams the reply; the oldest turns are dropped when the window is full.

    The runner's KV cache is kept between turns (``KVSession``): each turn only prefills the new user
    message, unless old turns had to be dropped (then the shortened history is prefilled once).
    """

    def __init__(self, bundle: Bundle, system: str | None = None, max_new_tokens: int = 200,
                 sampling: SamplingConfig | None = None):
        if not bundle.chat_template:
            raise AppError(f"{bundle.path} has no chat template", hint="export an instruct model (the default SmolLM2-135M-Instruct has one)")
        self.bundle = bundle
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or DEFAULT_SAMPLING
        self.turns: list[dict] = []  # user / assistant messages, oldest first
        self.dropped = 0  # messages forgotten to fit the window
        self.session = KVSession(bundle.runner)
        self.last = None  # the last Generation (timings, stop reason), or a Recalled reply
        self.user_name: str | None = None
        # Chat-format markers that end a reply even if the model skips its EOS token.
        self.stop_ids = [i for i in (bundle.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
                         if i is not None]

    def messages(self) -> list[dict]:
        system = self.system
        if self.user_name:  # also tell the model; the system message survives dropped turns
            default = "You are a helpful AI assistant."
            system = f"{system or default} The user's name is {self.user_name}."
        head = [{"role": "system", "content": system}] if system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        """The templated conversation, oldest turns dropped until it leaves room for a reply."""
        budget = self.bundle.context - self.max_new_tokens
        while True:
            ids = self.bundle.encode(self.bundle.render_chat(self.messages(), add_generation_prompt=True))
            if len(ids) <= budget:
                return ids
            if len(self.turns) <= 1:
                raise AppError(f"the message is {len(ids)} tokens; the window holds {budget} besides the reply",
                               hint="send a shorter message or a bundle with a longer --max-context")
            drop = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            self.turns = self.turns[drop:]
            self.dropped += drop

    def recall(self, text: str) -> str | None:
        """The answer from memory to a question about a remembered fact (the user's name), else None."""
        said = NAME_SAID.search(text)
        if said:
            self.user_name = said.group(1)
        if NAME_ASKED.search(text) and not said:
            return f"Your name is {self.user_name}." if self.user_name else None
        return None

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; it is added to the memory when the stream ends."""
        answer = self.recall(text)
        if answer:
            self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            self.last = Recalled(answer)
            yield answer
            return
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self.prompt_ids()
        except AppError:
            self.turns.pop()
            raise
        gen = generate(self.bundle, prompt, self.max_new_tokens, self.sampling, session=self.session)
        gen.stop_ids |= set(self.stop_ids)
        self.last = gen
        yield from gen
        self.turns.append({"role": "assistant", "content": gen.text.strip()})

    def reset(self) -> None:
        self.turns, self.dropped, self.user_name = [], 0, None
