"""The predictive-text terminal app: type, see the next 3 words update, Tab accepts the first.

    python -m examples.predictive_text [--bundle DIR]

Keys: printable characters type, Backspace deletes, Tab accepts suggestion 1, Ctrl-W/Ctrl-E/Ctrl-R
accept suggestion 1/2/3, Enter starts a new line, Esc / Ctrl-C / Ctrl-D quit. Without a terminal
(stdin is a pipe) every input line is answered with one ``suggestions:`` line, for scripts.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from pathlib import Path

from examples.common import AppError, open_bundle, resolve_bundle
from examples.predictive_text.suggest import Predictor, Suggestion, timed_suggest

ACCEPT_KEYS = {"\t": 0, "\x17": 0, "\x05": 1, "\x12": 2}  # Tab, Ctrl-W, Ctrl-E, Ctrl-R
QUIT_KEYS = {"\x1b", "\x03", "\x04"}
BACKSPACE = {"\x7f", "\x08"}


def format_suggestions(sugs: list[Suggestion], seconds: float) -> str:
    words = "  ".join(f"[{i + 1}] {s.word}" for i, s in enumerate(sugs)) or "(none)"
    return f"suggestions: {words}   ({seconds * 1000:.0f} ms)"


class Editor:
    """The typed text and the current suggestions; ``key`` applies one key press."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.text = ""
        self.suggestions: list[Suggestion] = []
        self.seconds = 0.0

    def refresh(self) -> None:
        self.suggestions, self.seconds = timed_suggest(self.predictor, self.text)

    def key(self, ch: str) -> bool:
        """Apply a key; False when it asks to quit."""
        if ch in QUIT_KEYS:
            return False
        if ch in ACCEPT_KEYS:
            i = ACCEPT_KEYS[ch]
            if i < len(self.suggestions):
                self.text += self.suggestions[i].completion
        elif ch in BACKSPACE:
            self.text = self.text[:-1]
        elif ch in ("\r", "\n"):
            self.text += "\n"
        elif ch.isprintable():
            self.text += ch
        return True


def _render(editor: Editor, out) -> None:
    """Redraw the two app lines in place: the current line of text, then the suggestions."""
    line = editor.text.split("\n")[-1]
    width = max(20, _columns() - 3)
    shown = line[-width:]
    out.write("\r\x1b[2K> " + shown + "\r\n\x1b[2K" + format_suggestions(editor.suggestions, editor.seconds))
    out.write(f"\x1b[1A\r\x1b[{len(shown) + 2}C")  # back to the end of the text line
    out.flush()


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 80


def run_terminal(predictor: Predictor) -> str:
    """The interactive loop in raw mode; returns the text typed."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    editor = Editor(predictor)
    out = sys.stdout
    out.write("Type; Tab accepts suggestion 1 (Ctrl-W/E/R: 1/2/3), Esc quits.\r\n\r\n")
    try:
        tty.setraw(fd)
        editor.refresh()
        _render(editor, out)
        while True:
            data = os.read(fd, 64).decode("utf-8", errors="ignore")
            if not data:
                break
            if any(not editor.key(ch) for ch in _keys(data)):
                break
            if select.select([fd], [], [], 0)[0]:
                continue  # more keys already waiting: catch up before predicting (typing ahead)
            if editor.text.endswith("\n"):
                out.write("\r\n")
            editor.refresh()
            _render(editor, out)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        out.write("\r\n\n")
        out.flush()
    return editor.text


def _keys(data: str):
    """Key presses in ``data``; arrow-key escape sequences are dropped (a lone Esc quits)."""
    i = 0
    while i < len(data):
        if data[i] == "\x1b" and i + 1 < len(data) and data[i + 1] in "[O":
            i += 3
            continue
        yield data[i]
        i += 1


def run_lines(predictor: Predictor, stream, out) -> None:
    """Non-interactive: one suggestions line per input line (the line is the typed text)."""
    for line in stream:
        text = line.rstrip("\n")
        sugs, secs = timed_suggest(predictor, text)
        out.write(format_suggestions(sugs, secs) + "\n")
        out.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.predictive_text", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="bundle folder (default: SmolLM2 onnx int8-dynamic, exported on first use)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-calls", type=int, default=8, help="model calls per suggestion (latency bound)")
    args = ap.parse_args(argv)
    try:
        bundle = open_bundle(resolve_bundle(args.bundle), threads=args.threads)
        predictor = Predictor(bundle, max_calls=args.max_calls)
        if sys.stdin.isatty():
            run_terminal(predictor)
        else:
            run_lines(predictor, sys.stdin, sys.stdout)
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
