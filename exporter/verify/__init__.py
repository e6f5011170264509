"""Does the bundle drop into the runtimes people ship? Run it through each one and compare greedy tokens.

A bundle runs in slm-export's own runner (``exporter.runtime``); apps load models through the field's
LLM runtimes (onnxruntime-genai, ExecuTorch's LLM runner, LiteRT-LM, transformers.js), each with its
own layout and metadata. ``verify`` runs the bundle's greedy prompt (shipped in
parity_reference.npz) through every runtime that applies to its format and reports, per runtime: its
version, whether it loads the bundle, whether its greedy tokens equal our runner's and the PyTorch
reference's, and its decode speed.

Each runtime is one module of this package that registers a ``FieldRuntime`` in ``RUNTIMES``:
adding a runtime is adding one file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..quiet import quiet
from ..registry import Registry
from ..runtime.base import REFERENCE_FILE
from ..runtime.files import load_manifest

# Statuses of a row. Only FAILED (the runtime is installed and rejects or crashes on the bundle) makes
# the export fail; DIFFERS is reported (a runtime with other kernels may flip a near-tie).
OK, DIFFERS, FAILED, NOT_INSTALLED, NOT_APPLICABLE = "ok", "differs", "failed", "not installed", "n/a"


@dataclass
class GreedyRun:
    """What a runtime produced for the greedy prompt."""

    tokens: list[int]
    decode_tokens_per_s: float | None = None
    note: str = ""
    # A runtime whose API yields text pieces, not ids (ExecuTorch's runner): its pieces, compared with
    # the others' tokens decoded one by one with the bundle's tokenizer.
    pieces: list[str] | None = None
    # A runtime that ends generation at a stop token (LiteRT-LM) returns fewer tokens, without the
    # stop token itself: ``stopped`` says so, ``stop_tokens`` are the ids it stops at. Its tokens then
    # equal another run's if they are that run's first ones and that run's next token is a stop token.
    stopped: bool = False
    stop_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class FieldRuntime:
    """One runtime a bundle should drop into.

    ``generate(bundle_dir, manifest, prompt_ids, n_tokens)`` runs greedy decoding of ``n_tokens``
    tokens after ``prompt_ids`` in that runtime and returns a ``GreedyRun``; it raises when the runtime
    rejects the bundle. ``applies(manifest)`` returns None when the runtime applies to the bundle, or
    the reason it does not. ``distribution`` is the installed package whose version is reported, and
    ``install`` the hint when it is missing (``module`` is imported only to tell whether it is there).
    A runtime that is not a Python package (transformers.js, a Node package) gives ``version()``
    instead: the installed version or None, replacing the distribution and module check.
    """

    name: str
    formats: tuple[str, ...]
    distribution: str
    module: str
    generate: Callable[[Path, dict, list[int], int], GreedyRun]
    install: str = ""
    applies: Callable[[dict], str | None] = lambda manifest: None
    is_ours: bool = False  # our own runner: the row the others are compared with
    order: int = 50  # table order (ours first)
    version: Callable[[], str | None] | None = None  # set: replaces installed_version + the module check


RUNTIMES: Registry[FieldRuntime] = Registry("runtime", __name__)


def register(runtime: FieldRuntime) -> FieldRuntime:
    """Register ``runtime`` under its name (called by each module of this package at import)."""
    return RUNTIMES.register(runtime.name, runtime)


@dataclass
class Row:
    """One runtime's line of the verify table."""

    runtime: str
    version: str = ""
    status: str = OK
    loads: bool | None = None
    same_as_ours: bool | None = None
    same_as_reference: bool | None = None
    decode_tokens_per_s: float | None = None
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] | None = None
    message: str = ""
    stop_tokens: tuple[int, ...] = ()  # set when the runtime stopped at one of these (see GreedyRun)


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def greedy_case(bundle_dir: Path) -> tuple[list[int], list[int]]:
    """The bundle's greedy prompt and the PyTorch reference's greedy tokens for it."""
    with np.load(Path(bundle_dir) / REFERENCE_FILE) as ref:
        return ref["greedy_prompt"].tolist(), ref["greedy_expected"].tolist()


def runtimes_for(manifest: dict) -> list[FieldRuntime]:
    """The registered runtimes that run the bundle's format, ours first."""
    return sorted((r for r in RUNTIMES if manifest.get("format") in r.formats), key=lambda r: (r.order, r.name))


def verify(bundle_dir: Path, manifest: dict | None = None, only: tuple[str, ...] = (),
           progress: Callable[[str], None] = lambda m: None) -> list[Row]:
    """One ``Row`` per runtime that runs the bundle's format (``only``: just these names).

    Causal LMs only: an encoder or classifier bundle gets an empty list (these runtimes generate text).
    """
    from ..errors import condense

    bundle_dir = Path(bundle_dir)
    manifest = manifest if manifest is not None else load_manifest(bundle_dir)
    if manifest.get("model", {}).get("kind") != "causal-lm":
        return []
    prompt, expected = greedy_case(bundle_dir)
    rows, ours = [], None
    for rt in runtimes_for(manifest):
        if only and rt.name not in only and not rt.is_ours:
            continue
        row = Row(rt.name, version=(rt.version() if rt.version else installed_version(rt.distribution)) or "")
        reason = rt.applies(manifest)
        if reason:
            row.status, row.message = NOT_APPLICABLE, reason
        elif not row.version or (rt.version is None and importlib.util.find_spec(rt.module.split(".")[0]) is None):
            row.status, row.message = NOT_INSTALLED, f"not installed: {rt.install or 'pip install ' + rt.distribution}"
        else:
            progress(f"verify: {rt.name} {row.version}")
            try:
                with quiet():  # runtimes print load logs and statistics from C++
                    run = rt.generate(bundle_dir, manifest, prompt, len(expected))
            except Exception as e:  # the runtime rejected the bundle: its message, condensed
                row.status, row.loads, row.message = FAILED, False, condense(e, limit=300)
            else:
                row.loads, row.tokens, row.pieces, row.message = True, list(run.tokens), run.pieces, run.note
                row.decode_tokens_per_s = run.decode_tokens_per_s
                row.stop_tokens = tuple(run.stop_tokens) if run.stopped else ()
        if rt.is_ours:
            ours = row
        rows.append(row)
    pieces = _piece_decoder(bundle_dir, rows)
    for row in rows:
        if not row.loads:
            continue
        row.same_as_reference = same_greedy(row, expected, pieces)
        if ours is not None and ours.loads:
            row.same_as_ours = same_greedy(row, ours.tokens, pieces)
            if row is not ours and not row.same_as_ours:
                row.status = DIFFERS
                diff = (first_difference(pieces(ours), pieces(row)) if row.pieces is not None
                        else first_difference(ours.tokens, row.tokens))
                row.message = (row.message + "; " if row.message else "") + diff
    return rows


def _piece_decoder(bundle_dir: Path, rows: list[Row]) -> Callable:
    """``pieces(row or token list)``: a row's text pieces, or its tokens decoded one by one (needed
    only when some runtime reports pieces; the bundle's tokenizer.json decodes)."""
    decode = None
    if any(r.pieces is not None for r in rows):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
        decode = lambda ids: [tokenizer.decode([i], skip_special_tokens=False) for i in ids]  # noqa: E731

    def pieces(item) -> list[str]:
        if isinstance(item, Row):
            return item.pieces if item.pieces is not None else decode(item.tokens)
        return decode(item)

    return pieces


def same_greedy(row: Row, tokens: list[int], pieces: Callable) -> bool:
    """Are ``row``'s greedy outputs ``tokens``? A row of text pieces is compared with ``tokens`` decoded
    one by one; a row that stopped at a stop token matches their first ones if the next of ``tokens``
    is one of its stop tokens."""
    if row.pieces is not None:
        return row.pieces == pieces(tokens)
    if not row.stop_tokens:
        return row.tokens == tokens
    k = len(row.tokens)
    return tokens[:k] == row.tokens and len(tokens) > k and tokens[k] in row.stop_tokens


def first_difference(ours: list, theirs: list) -> str:
    """Where two greedy outputs (token ids or text pieces) part, e.g. 'token 3: 517 here, 88 in slm-export'."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"token {i}: {b!r} here, {a!r} in slm-export"
    return f"{len(theirs)} tokens here, {len(ours)} in slm-export"


def failed(rows: list[Row]) -> list[Row]:
    """The rows that make the export fail (a runtime that is installed and rejects the bundle)."""
    return [r for r in rows if r.status == FAILED]


def as_json(rows: list[Row]) -> list[dict]:
    """The rows for the manifest (without the tokens themselves)."""
    return [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("tokens", "pieces")} for r in rows]


def rows_from_json(manifest: dict) -> list[Row]:
    """The rows of a manifest's ``runtimes`` section (what ``as_json`` wrote)."""
    return [Row(**row) for row in manifest.get("runtimes") or []]


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    """Text cells of the verify table: runtime, version, loads, = ours, = reference, decode tok/s, note."""
    def yes_no(v):
        return "-" if v is None else ("yes" if v else "no")

    return [(r.runtime, r.version or "-", yes_no(r.loads), yes_no(r.same_as_ours), yes_no(r.same_as_reference),
             "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}",
             r.status if not r.message else f"{r.status}: {r.message}") for r in rows]


TABLE_HEADER = ("runtime", "version", "loads", "greedy = ours", "= PyTorch", "decode tok/s", "status")


def timed_greedy(step: Callable[[int | None], int], n_tokens: int) -> GreedyRun:
    """Greedy decoding driven by ``step(previous_token) -> next_token`` (None first: the prefill).

    Decode speed counts the tokens after the first one (the first comes out of the prefill).
    """
    tokens = [step(None)]
    t0 = time.perf_counter()
    while len(tokens) < n_tokens:
        tokens.append(step(tokens[-1]))
    elapsed = time.perf_counter() - t0
    return GreedyRun(tokens, (len(tokens) - 1) / elapsed if len(tokens) > 1 and elapsed > 0 else None)
