"""The bundle side of the farm: what is deployed (a verified bundle plus the device-side runtime).

The device receives two folders: ``bundle`` (the exported bundle) and ``slm_runtime`` (a copy of
``exporter/runtime``, which imports only relatively, so it runs under that name without the rest of
slm-export). ``Bundle.files`` lists the sha256 of every file of both, which the device checks before
anything is run; ``deploy_name`` holds a hash of that list, so an intact earlier deployment is reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..bundle import sha256
from ..errors import SlmExportError

EXPORTER_DIR = Path(__file__).parent.parent
DEVICE_SCRIPT = EXPORTER_DIR / "farm_device.py"  # self-contained: sent as ``python -c``
RUNTIME_DIR = EXPORTER_DIR / "runtime"
RUNTIME_PACKAGE = "slm_runtime"  # the name exporter/runtime gets on the device (it imports only relatively)


@dataclass
class Bundle:
    """A bundle to deploy: its folder, manifest, runtime spec and the hashes the device must match."""

    path: Path
    manifest: dict
    spec: dict
    files: dict  # rel path (under the deployment folder) -> {"sha256", "bytes"}
    deploy_name: str

    @property
    def label(self) -> str:
        """``<format>/<recipe>``: how reports name this bundle."""
        return f"{self.manifest['format']}/{self.manifest['recipe']}"

    @property
    def format(self) -> str:
        return self.manifest["format"]


def load_bundle(path: str | Path, runtime_copy: Path) -> Bundle:
    """Read a bundle, refuse a damaged one, and list every file the device must receive intact."""
    from .. import bundle as bundle_mod

    path = Path(path)
    if not (path / bundle_mod.MANIFEST).exists():
        raise SlmExportError(f"{path} is not a slm-export bundle (no {bundle_mod.MANIFEST})",
                             hint="build one with `slm-export --target TARGET --out DIR`")
    bad = bundle_mod.verify(path)
    if bad:
        raise SlmExportError(f"bundle {path} does not match its manifest.json: {'; '.join(bad[:3])}",
                             hint="export the bundle again")
    from ..runtime.base import RunnerError, read_spec
    from ..runtime.files import load_manifest

    manifest = load_manifest(path)  # verify() above refused symlinks, special and undeclared files
    try:
        spec = read_spec(path)
    except RunnerError as e:
        raise SlmExportError(f"bundle {path}: {e}") from None
    files = _deployed_files(path, manifest, runtime_copy)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "bundle"
    return Bundle(path=path, manifest=manifest, spec=spec, files=files, deploy_name=f"{safe}-{digest}")


def _deployed_files(path: Path, manifest: dict, runtime_copy: Path) -> dict:
    """``bundle/<rel>`` and ``slm_runtime/<rel>`` -> {"sha256", "bytes"} for every file sent."""
    from ..runtime.files import walk_plain_files

    files = {}
    for root, prefix in ((path, "bundle"), (runtime_copy, RUNTIME_PACKAGE)):
        for rel in walk_plain_files(root):
            # verify() has just hashed the manifest's files: only the rest (manifest, reports, runtime) here.
            entry = manifest["files"].get(rel) if root is path else None
            p = root / rel
            files[f"{prefix}/{rel}"] = entry or {"sha256": sha256(p), "bytes": p.stat().st_size}
    return files


def runtime_copy(dest: Path) -> Path:
    """A clean copy of the device-side runtime package (no caches) to deploy as ``slm_runtime``."""
    out = dest / RUNTIME_PACKAGE
    shutil.copytree(RUNTIME_DIR, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def device_script() -> str:
    """The device-side script's source (run there as ``python -c``: nothing is installed first)."""
    return DEVICE_SCRIPT.read_text()
