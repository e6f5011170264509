"""Next-word suggestions: whole words, not sub-word tokens, found by a best-first search over tokens.

The typed text splits into a context (complete words) and the word being typed (maybe empty). The
next word's bytes must start with ``required`` = the separating spaces + the typed part. The search
expands partial words in order of probability; a partial word becomes a finished suggestion with the
probability that the model ends it there (the mass of tokens that start with a non-word byte: a
space, punctuation, a newline, EOS). Because probabilities only shrink as a word grows, once three
finished words beat every open partial word they are the exact top three; a budget of model calls
bounds the latency otherwise.

The context is cached in the runner's KV cache between keystrokes (examples.common.KVSession), and the
log-probabilities of the partial words already explored are kept while the context stays the same,
so a keystroke inside a word usually costs zero to two model calls, and a new word a few more.
"""

from __future__ import annotations

import bisect
import heapq
import re
import time
from dataclasses import dataclass

import numpy as np

from examples.common import Bundle, KVSession

WORD_ASCII = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'")
# The word list's source: shipped English text (the calibration sample; the eval sample stays held out).
LEXICON_TEXTS = ("calibration_english.txt",)
MIN_TOKEN_WORD = 4  # letters a vocabulary token needs to count as a word on its own
CONTRACTION = re.compile(r"^([a-z]+?)(n't|'s|'ll|'re|'ve|'d|'m)$")
# Contractions whose base is no word of its own ("can't" = "ca" + "n't").
CONTRACTION_BASES = {"ca", "wo", "sha", "ai"}
# Contractions written without the apostrophe: BPE vocabularies of web text hold " dont", " wouldnt".
APOSTROPHE_LESS = re.compile(r"^(?:(?:do|does|did|is|are|was|were|has|have|had|would|could|should|must|need|ca|wo|ai)nt"
                             r"|im|ive|youre|theyre|thats|whats|hes|shes|youve|weve|theyve|ill|youll|itll|id|youd)$")
OPENERS = "\n\"'(“‘[-"
_PARTIAL = re.compile(r"[\w'’]*\Z")


def is_word_char(c: str) -> bool:
    return c.isalnum() or c in "'’"


def word_bytes(b: bytes) -> bool:
    """True if ``b`` is all word characters (letters, digits, apostrophes). A token that is part of a
    UTF-8 character cannot be decoded alone: its non-ASCII bytes count as letters."""
    try:
        return all(is_word_char(c) for c in b.decode("utf-8"))
    except UnicodeDecodeError:
        return all(c in WORD_ASCII or c >= 0x80 for c in b)


def starts_word(b: bytes) -> bool:
    """True if the first character of ``b`` is a word character (a cut-off UTF-8 character counts)."""
    if b[0] < 0x80:
        return b[0] in WORD_ASCII
    for n in (2, 3, 4):
        try:
            return is_word_char(b[:n].decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return True


def normalise(word: str) -> str:
    """What makes two suggestions the same word: case and curly vs straight apostrophes."""
    return word.replace("’", "'").lower()


class Lexicon:
    """The words a suggestion may be: whole-word tokens of the vocabulary (" door") and the words of
    shipped text, plus their contractions. A search over sub-word tokens can otherwise end on glued
    pieces ("liketo", "toHost", "meetingroom") when the model's end-of-word mass happens to be high."""

    def __init__(self, token_bytes: list, texts=()):
        words = set()
        for b in token_bytes:
            if b and b[:1] == b" ":
                w = b[1:].decode("utf-8", errors="replace")
                # Short tokens are as often pieces (" wor", " whi", " b") as words: those come from text only.
                if w.isalpha() and len(w) >= MIN_TOKEN_WORD:
                    words.add(normalise(w))
        for text in texts:
            words.update(normalise(w) for w in re.findall(r"[A-Za-z]+(?:['’][A-Za-z]+)?", text))
        self.words = {w for w in words if not APOSTROPHE_LESS.match(w)}

    def __contains__(self, word: str) -> bool:
        w = normalise(word)
        if w in self.words:
            return True
        m = CONTRACTION.match(w)
        return bool(m) and (m.group(1) in self.words or m.group(1) in CONTRACTION_BASES)


def shipped_texts() -> list[str]:
    """The English samples shipped with slm-export (no download)."""
    from exporter.texts import builtin_text

    return [builtin_text(name) for name in LEXICON_TEXTS]


def acceptable(word: str, typed: str, lexicon: Lexicon) -> bool:
    """A suggestion worth a slot: starts with a letter or digit (not "'s"), is a known word, and is
    not just the word already typed."""
    return bool(word) and word[0].isalnum() and normalise(word) != normalise(typed) and word in lexicon


@dataclass
class Suggestion:
    word: str  # the whole word, including the part already typed
    completion: str  # what Tab inserts (rest of the word + a space)
    logprob: float


class VocabIndex:
    """Per-token facts the search needs, computed once per tokenizer."""

    def __init__(self, token_bytes: list):
        n = len(token_bytes)
        self.bytes = token_bytes
        self.pure_word = np.zeros(n, dtype=bool)  # only word bytes: continues a word
        self.word_start = np.zeros(n, dtype=bool)  # spaces then word bytes: starts a word
        self.boundary = np.zeros(n, dtype=bool)  # ends the current word (non-word first byte, special token)
        for i, b in enumerate(token_bytes):
            if not b:
                self.boundary[i] = True
                continue
            if not starts_word(b):
                self.boundary[i] = True
            stripped = b.lstrip(b" ")
            if stripped and word_bytes(stripped):
                if len(stripped) == len(b):
                    self.pure_word[i] = True
                else:
                    self.word_start[i] = True
        pairs = sorted((b, i) for i, b in enumerate(token_bytes) if b)
        self.sorted_bytes = [p[0] for p in pairs]
        self.sorted_ids = [p[1] for p in pairs]
        self.by_bytes: dict[bytes, list[int]] = {}
        for b, i in pairs:
            self.by_bytes.setdefault(b, []).append(i)

    def matching(self, need: bytes) -> list[int]:
        """Tokens consistent with still-needed bytes ``need``: a prefix of it, or it followed by word bytes."""
        out = [i for k in range(1, len(need)) for i in self.by_bytes.get(need[:k], [])]
        lo = bisect.bisect_left(self.sorted_bytes, need)
        hi = bisect.bisect_left(self.sorted_bytes, need + b"\xff\xff\xff\xff")
        for j in range(lo, hi):
            b = self.sorted_bytes[j]
            if not b[len(need):] or word_bytes(b[len(need):]):
                out.append(self.sorted_ids[j])
        return out


def split_typed(text: str) -> tuple[str, str]:
    """(context, required): the text before the word being typed (trailing spaces removed, since BPE
    tokenizers attach the space to the next word) and the bytes the next word must start with."""
    partial = _PARTIAL.search(text).group()
    before = text[:len(text) - len(partial)]
    context = before.rstrip(" ")
    return context, before[len(context):] + partial


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class Predictor:
    """Suggests the next ``k`` whole words for typed text, keeping the context in the KV cache."""

    def __init__(self, bundle: Bundle, k: int = 3, max_calls: int = 8, branch: int = 4, context_tokens: int = 96):
        self.bundle = bundle
        self.k, self.max_calls, self.branch = k, max_calls, branch
        self.context_tokens = context_tokens
        self.vocab = VocabIndex(bundle.token_bytes)
        self.lexicon = Lexicon(bundle.token_bytes, shipped_texts())
        self.session = KVSession(bundle.runner)
        # Fed only when there is no context at all (the model needs one token to predict from).
        start = bundle.tokenizer.token_to_id("<|endoftext|>")
        if start is None:
            start = bundle.spec.get("bos_token_id")
        self.start_ids = [start] if start is not None else bundle.eos_ids[:1]
        self._window_start = 0  # char offset where the context window starts (moves in jumps: cache-friendly)
        self.last_calls = 0
        self._cache: dict[tuple, np.ndarray] = {}  # log-probs after ctx + partial-word tokens
        self._cache_ctx: list[int] = []

    def context_ids(self, context: str) -> list[int]:
        """Token ids of the context's tail: at most ``context_tokens``, cut at a word boundary."""
        if self._window_start > len(context):
            self._window_start = 0
        ids = self.bundle.encode(context[self._window_start:])
        if len(ids) > self.context_tokens:  # jump so that about half the window remains
            tail = context[self._window_start:]
            cut = len(tail) // 2
            space = tail.find(" ", cut)
            self._window_start += (space if space > 0 else cut)
            ids = self.bundle.encode(context[self._window_start:])[-self.context_tokens:]
        return ids or self.start_ids

    def suggest(self, text: str) -> list[Suggestion]:
        """The ``k`` most likely whole next words (completing the word being typed, if any)."""
        context, required = split_typed(text)
        ctx = self.context_ids(context)
        if not ctx:
            return []
        if ctx != self._cache_ctx:  # the search tree of earlier keystrokes in this word is reusable
            self._cache, self._cache_ctx = {}, ctx
        req = required.encode("utf-8")
        typed = required.lstrip(" ")
        # After a newline or an opening quote/bracket a word may start without a space.
        at_start = not context or context[-1] in OPENERS
        vocab = self.vocab
        heap: list[tuple[float, tuple, bytes]] = [(0.0, (), b"")]
        done: dict[str, tuple[float, str]] = {}  # normalised word -> (score, word): one slot per word
        calls = 0
        while heap and calls < self.max_calls:
            neg, toks, s = heapq.heappop(heap)
            best = sorted((v[0] for v in done.values()), reverse=True)
            if len(best) >= self.k and best[self.k - 1] >= -neg:
                break  # no open partial word can beat the k finished ones
            lp = self._cache.get(toks)
            if lp is None:
                lp = _log_softmax(self.session.feed(ctx + list(toks))).astype(np.float32)
                self._cache[toks] = lp
                calls += 1
            self._finish(done, s, req, typed, -neg, lp)
            for t in self._children(lp, s, req, at_start):
                heapq.heappush(heap, (neg - lp[t], toks + (t,), s + vocab.bytes[t]))
        self.last_calls = calls
        ranked = sorted(done.values(), key=lambda v: -v[0])[:self.k]
        return [Suggestion(word, word[len(typed):] + " " if word.startswith(typed) else word + " ", score)
                for score, word in ranked]

    def _finish(self, done: dict, s: bytes, req: bytes, typed: str, logprob: float, lp: np.ndarray) -> None:
        """Record partial word ``s`` as a finished suggestion, scored by P(word) x P(the word ends)."""
        raw = s.lstrip(b" ")
        if len(s) < len(req) or not raw or not starts_word(raw) or raw.endswith((b"'", "’".encode())):
            return
        try:
            word = raw.decode("utf-8")
        except UnicodeDecodeError:  # ends inside a multi-byte character: not a word yet
            return
        if not acceptable(word, typed, self.lexicon):
            return
        score = logprob + float(np.logaddexp.reduce(lp[self.vocab.boundary]))
        key = normalise(word)
        if key not in done or done[key][0] < score:
            done[key] = (score, word)

    def _children(self, lp: np.ndarray, s: bytes, req: bytes, at_start: bool) -> list[int]:
        """The ``branch`` most likely tokens that extend partial word ``s`` consistently with ``req``."""
        vocab = self.vocab
        cand = None
        if len(s) < len(req):  # still inside what the user typed
            cand = vocab.matching(req[len(s):])
        elif s:  # the word (or its space) has begun: only word bytes continue it
            mask = vocab.pure_word
        else:  # nothing yet: a token with its leading space, or a bare word at the start of a line
            mask = vocab.word_start | vocab.pure_word if at_start else vocab.word_start
        if cand is not None:
            cand = np.asarray(sorted(set(cand)), dtype=np.int64)
            if not len(cand):
                return []
            scores = lp[cand]
            order = np.argsort(-scores)[:self.branch]
            return [int(cand[i]) for i in order]
        scores = np.where(mask, lp, -np.inf)
        top = np.argpartition(-scores, self.branch)[:self.branch]
        return [int(t) for t in top[np.argsort(-scores[top])] if np.isfinite(scores[t])]


def timed_suggest(predictor: Predictor, text: str) -> tuple[list[Suggestion], float]:
    """Suggestions and the seconds they took."""
    t0 = time.perf_counter()
    out = predictor.suggest(text)
    return out, time.perf_counter() - t0
