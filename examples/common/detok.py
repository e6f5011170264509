"""Streaming detokenization and token byte tables.

Byte-level BPE tokens are often parts of a UTF-8 character (an emoji is 2-4 tokens) and
SentencePiece-style decoders drop a leading space when a sequence is decoded on its own, so
decoding token by token gives garbage. ``StreamDecoder`` decodes a short window of recent tokens
and emits only the text that has become final (the approach of transformers' TextStreamer).
"""

from __future__ import annotations

import json
import re


class StreamDecoder:
    """Turns tokens into text pieces as they arrive; ``push`` returns the new final text (maybe "")."""

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window (text before it is already emitted)
        self.read = 0  # tokens up to here are emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # U+FFFD: an incomplete UTF-8 character
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopStringFilter:
    """Holds back streamed text that might be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)[0]], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes_table(tokenizer) -> list:
    """The bytes each token id stands for (None for special tokens), for ByteLevel and Metaspace tokenizers."""
    desc = json.loads(tokenizer.to_str())
    decoder = json.dumps(desc.get("decoder") or {})
    special = {t["id"] for t in desc.get("added_tokens", []) if t.get("special")}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table: list = [None] * size
    if '"ByteLevel"' in decoder:
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        for i in range(size):
            tok = tokenizer.id_to_token(i)
            if tok is None or i in special:
                continue
            try:
                table[i] = bytes(inverse[c] for c in tok)
            except KeyError:  # an added non-special token stored as plain text
                table[i] = tok.encode("utf-8")
        return table
    for i in range(size):  # Metaspace / byte-fallback (SentencePiece-style) or anything else
        tok = tokenizer.id_to_token(i)
        if tok is None or i in special:
            continue
        m = _BYTE_FALLBACK.match(tok)
        if m:
            table[i] = bytes([int(m.group(1), 16)])
        elif '"Metaspace"' in decoder or "▁" in tok:
            table[i] = tok.replace("▁", " ").encode("utf-8")
        else:
            text = tokenizer.decode([i])
            table[i] = None if "\ufffd" in text else text.encode("utf-8")
    return table
