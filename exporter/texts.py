"""Real English text shipped with the tool (public domain, see exporter/data/SOURCES.md).

``eval_english.txt`` (Pride and Prejudice) measures parity; ``calibration_english.txt`` (Emma)
calibrates static quantization by default, so calibration never sees the evaluation text.
"""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path

from .errors import SlmExportError


def builtin_text(name: str) -> str:
    """The text of ``exporter/data/<name>``."""
    return resources.files("exporter").joinpath("data", name).read_text(encoding="utf-8")


def eval_text() -> str:
    return builtin_text("eval_english.txt")


# Calibration uses at most a few dozen windows of a few hundred tokens (~100 KB of text); a bigger
# file is read up to this bound, so a huge file (or /dev/zero) cannot exhaust memory.
CALIBRATION_MAX_BYTES = 4 << 20


def calibration_texts(path: Path | None = None, progress=lambda m: None) -> list[str]:
    """Calibration text: the user's file (``--calibration FILE``) or the built-in sample, as paragraphs.

    The file must be a regular file (a FIFO would block, a device never end) of UTF-8 text; only its
    first ``CALIBRATION_MAX_BYTES`` are read.
    """
    if path is not None:
        text = _read_calibration(Path(path), progress)
        if len(text.split()) < 20:
            raise SlmExportError(f"calibration file {path} holds too little text (need at least 20 words)")
    else:
        text = builtin_text("calibration_english.txt")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs if p]


def _read_calibration(path: Path, progress) -> str:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SlmExportError(f"calibration file {path} is not a regular file (a FIFO, device or folder)",
                                 hint="give a text file, e.g. --calibration my_texts.txt")
        with open(path, "rb") as f:
            data = f.read(CALIBRATION_MAX_BYTES)
    except OSError as e:
        raise SlmExportError(f"cannot read calibration file {path}: {e.strerror}") from None
    if st.st_size > CALIBRATION_MAX_BYTES:
        progress(f"calibration: using the first {CALIBRATION_MAX_BYTES >> 20} MB of {path} "
                 f"({st.st_size / 2**20:.0f} MB); calibration needs far less")
        data = data[:data.rfind(b"\n") + 1 or len(data)]  # whole lines only
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if st.st_size > CALIBRATION_MAX_BYTES and e.start >= len(data) - 3:  # the bound cut a character
            return data[:e.start].decode("utf-8")
        raise SlmExportError(f"calibration file {path} is not UTF-8 text (byte {e.start})",
                             hint="convert it with iconv -t utf-8") from None


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer puts around every sequence it encodes (its own config says which).

    Gemma adds BOS, BERT adds [CLS] ... [SEP], SmolLM2 adds nothing. A model scored without them is
    scored on inputs it never saw in training (Gemma-3-270M: perplexity 294 without BOS, 24 with it),
    so every window and prompt the tool builds gets them.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def encode_text(tokenizer, text: str) -> list[int]:
    """``text`` as one sequence, with the tokenizer's own special tokens around it."""
    prefix, suffix = special_tokens_around(tokenizer)
    return prefix + tokenizer(text, add_special_tokens=False)["input_ids"] + suffix


def token_windows(tokenizer, text: str, window: int, max_windows: int) -> list[list[int]]:
    """Consecutive slices of ``text`` (at most ``max_windows``) of ``window`` tokens each, for eval or
    calibration; each is a sequence of its own, with the tokenizer's special tokens around it."""
    prefix, suffix = special_tokens_around(tokenizer)
    body = window - len(prefix) - len(suffix)
    if body < 1:
        raise SlmExportError(f"a window of {window} tokens cannot hold the tokenizer's special tokens")
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"]
    windows = [prefix + ids[i:i + body] + suffix for i in range(0, len(ids) - body + 1, body)]
    if not windows and ids:
        windows = [prefix + ids[:body] + suffix]
    return windows[:max_windows]


def calibration_windows(tokenizer, texts: list[str], window: int, max_windows: int) -> list[list[int]]:
    """Token windows for calibration, taken from the joined ``texts``."""
    return token_windows(tokenizer, "\n\n".join(texts), window, max_windows)
