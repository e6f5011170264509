"""Real English text shipped with the tool (public domain, see exporter/data/SOURCES.md).

``eval_english.txt`` (Pride and Prejudice) measures parity; ``calibration_english.txt`` (Emma)
calibrates static quantization by default, so calibration never sees the evaluation text.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import SlmExportError


def builtin_text(name: str) -> str:
    """The text of ``exporter/data/<name>``."""
    return resources.files("exporter").joinpath("data", name).read_text(encoding="utf-8")


def eval_text() -> str:
    return builtin_text("eval_english.txt")


def calibration_texts(path: Path | None = None) -> list[str]:
    """Calibration text: the user's file (``--calibration FILE``) or the built-in sample, as paragraphs."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlmExportError(f"cannot read calibration file {path}: {e}") from None
        if len(text.split()) < 20:
            raise SlmExportError(f"calibration file {path} holds too little text (need at least 20 words)")
    else:
        text = builtin_text("calibration_english.txt")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs if p]


def token_windows(tokenizer, text: str, window: int, max_windows: int) -> list[list[int]]:
    """Consecutive ``window``-token slices of ``text`` (at most ``max_windows``), for eval or calibration."""
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if not windows and ids:
        windows = [ids[:window]]
    return windows[:max_windows]


def calibration_windows(tokenizer, texts: list[str], window: int, max_windows: int) -> list[list[int]]:
    """Token windows for calibration, taken from the joined ``texts``."""
    return token_windows(tokenizer, "\n\n".join(texts), window, max_windows)
