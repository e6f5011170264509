"""A bundle is untrusted input: the plain files of one folder, checked before anything is loaded.

What a runner may read of a bundle (``runtime.json``, the artifact, the reference outputs) is named by
paths inside the bundle's own files, which whoever made the bundle controls. Every such path goes
through ``bundle_path``: a relative POSIX path of plain parts that stays inside the folder and names a
regular file (no symlink, FIFO or device, which could leak a file of the machine or hang a read). Every
file that can be large is read with a bound. ``verify_bundle`` checks the sha256 and size of every file
the manifest lists, and that the folder holds nothing else, so the file that runs is the file that was
verified. Nothing in a bundle is ever imported as code (see ``pte_runner``'s kernel allow-list).

Standard library only: this package runs on devices with just numpy and a runtime installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

MANIFEST = "manifest.json"
# Files a bundle carries beyond those its manifest hashes: the manifest itself and the reports
# written from it (they are derived from the manifest, so they cannot be listed in it).
UNHASHED = (MANIFEST, "report.md", "report.html")
# Bounds for the small JSON files a runner reads (a real runtime.json is a few KB, a manifest tens).
SPEC_MAX_BYTES = 4 << 20
MANIFEST_MAX_BYTES = 32 << 20


class BundleFileError(Exception):
    """A bundle file is missing, outside the bundle, not a plain file, too large or damaged.

    ``exporter.runtime.base.RunnerError`` derives from it, so runners report it like any other
    reason a bundle cannot run here.
    """


def bundle_path(bundle_dir: Path, rel: object, what: str = "file") -> Path:
    """``bundle_dir / rel`` after checking that ``rel`` is a plain relative path to a regular file inside.

    Refused: a non-string, an absolute path, ``..`` or empty parts, backslashes, NUL, a path through or to
    a symlink, and anything that is not a regular file (FIFOs and devices would hang or leak a read).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BundleFileError(f"the bundle names its {what} as {rel!r}: not a plain relative path")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts) or rel != "/".join(parts):
        raise BundleFileError(f"the bundle names its {what} as {rel!r}, a path that leaves the bundle folder")
    root = Path(bundle_dir)
    path = root
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BundleFileError(f"{what} {rel} is missing from the bundle {root}") from None
        except OSError as e:
            raise BundleFileError(f"cannot read {what} {rel} of the bundle: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleFileError(f"{what} {rel} of the bundle is (or goes through) a symlink; "
                                  "a bundle holds plain files only")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise BundleFileError(f"{what} {rel}: {'/'.join(parts[:i + 1])} is not a folder")
        if last and not stat.S_ISREG(st.st_mode):
            raise BundleFileError(f"{what} {rel} of the bundle is not a regular file (a FIFO, device or folder)")
    return path


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of regular file ``path``, refused if it is larger than ``limit`` (or not a regular file)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BundleFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleFileError(f"{what} {path} is not a regular file")
    if st.st_size > limit:
        raise BundleFileError(f"{what} {path} is {st.st_size / 2**20:.1f} MB, more than the {limit / 2**20:.0f} MB "
                              "such a file can hold")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read
        raise BundleFileError(f"{what} {path} is larger than {limit / 2**20:.0f} MB")
    return data


def read_json(path: Path, limit: int, what: str) -> dict:
    """A JSON object read from ``path`` with a size bound; anything else is a BundleFileError."""
    data = read_bounded(path, limit, what)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleFileError(f"{what} {path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise BundleFileError(f"{what} {path} is not a JSON object")
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def walk_plain_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root``; refuses symlinks and special files anywhere."""
    out = []
    root = Path(root)

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                if entry.is_symlink():
                    raise BundleFileError(f"{rel} in {root} is a symlink; a bundle holds plain files only")
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), rel + "/")
                elif entry.is_file(follow_symlinks=False):
                    out.append(rel)
                else:
                    raise BundleFileError(f"{rel} in {root} is not a regular file (a FIFO, socket or device)")

    walk(root, "")
    return out


def load_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest.json (bounded, an object with a ``files`` table of plain entries)."""
    path = bundle_path(bundle_dir, MANIFEST, "manifest")
    manifest = read_json(path, MANIFEST_MAX_BYTES, "manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleFileError(f"{path} has no table of files")
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)):
            raise BundleFileError(f"{path}: the entry for {rel!r} has no sha256 and size")
    return manifest


def verify_bundle(bundle_dir: Path, manifest: dict | None = None) -> list[str]:
    """Problems of ``bundle_dir`` against its manifest (empty when intact).

    Every listed file must be a plain file inside the folder with the listed size and sha256, and the
    folder must hold nothing but those files and the unhashed ones (``UNHASHED``). A path that leaves
    the folder, a symlink or a special file raises BundleFileError before anything is read.
    """
    manifest = manifest if manifest is not None else load_manifest(bundle_dir)
    problems = []
    declared = set(manifest["files"]) | set(UNHASHED)
    for rel in walk_plain_files(bundle_dir):
        if rel not in declared:
            problems.append(f"{rel}: not listed in {MANIFEST}")
    for rel, entry in manifest["files"].items():
        try:
            path = bundle_path(bundle_dir, rel, "listed file")
        except BundleFileError as e:
            if "is missing" in str(e):
                problems.append(f"{rel}: missing")
                continue
            raise
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems
