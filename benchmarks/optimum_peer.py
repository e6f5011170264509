"""Our exports against the peer a user would pick instead: optimum-onnx, in the same benchmark run.

    python benchmarks/optimum_peer.py BUNDLE [BUNDLE ...] --out DIR [--model PATH] [--rounds 5]

optimum-onnx pins an older transformers than this project (see TOOLCHAIN.md), so it gets its own
virtual environment, built once under ``$SLM_EXPORT_CACHE/optimum-peer`` (torch from the same
2.13.0 wheel, optimum-onnx and onnxruntime from PyPI). The model is exported there with the
documented command ``optimum-cli export onnx --task text-generation-with-past`` (once, cached), then
``slm-export bench`` measures the bundles, PyTorch eager and optimum's export in one interleaved run,
with the same prompt and the same parity windows for all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.loading import default_cache_dir, load_model  # noqa: E402

PEER_PACKAGES = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0"]


def peer_python(root: Path) -> Path:
    """The peer venv's Python, creating the venv on first use."""
    python = root / "venv" / "bin" / "python"
    marker = root / "venv" / ".complete"
    if not marker.exists():
        print(f"building the optimum-onnx venv in {root / 'venv'} (once)", file=sys.stderr)
        venv.create(root / "venv", with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        marker.write_text(" ".join(PEER_PACKAGES))
    return python


def peer_model_folder(model_folder: Path, root: Path) -> Path:
    """The model folder as the peer's older transformers reads it.

    transformers 5 writes ``rope_theta`` inside ``rope_parameters``; 4.57 (optimum-onnx's pin) reads
    it from the top level and silently falls back to 10000 (SmolLM2 uses 100000): the peer would
    export a different model (measured: top-1 0.835, ppl +12% against the real one). So the peer gets
    a folder whose config.json has both spellings; the other files are symlinks.
    """
    import json

    out = root / f"model-{model_folder.name}"
    out.mkdir(parents=True, exist_ok=True)
    for f in model_folder.iterdir():
        link = out / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config = json.loads((model_folder / "config.json").read_text())
    for key, value in (config.get("rope_parameters") or {}).items():
        if key == "rope_theta":
            config.setdefault("rope_theta", value)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def optimum_export(python: Path, model_folder: Path, root: Path) -> Path:
    """``optimum-cli export onnx --task text-generation-with-past`` of the model folder (cached)."""
    out = root / f"export-{model_folder.name}"
    model_folder = peer_model_folder(model_folder, root)
    if not (out / "model.onnx").exists():
        print(f"optimum-cli export onnx {model_folder} -> {out}", file=sys.stderr)
        cli = python.parent / "optimum-cli"
        subprocess.run([str(cli), "export", "onnx", "--model", str(model_folder), "--task",
                        "text-generation-with-past", str(out)], check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    root = default_cache_dir() / "optimum-peer"
    root.mkdir(parents=True, exist_ok=True)
    python = peer_python(root)
    folder = Path(load_model(args.model).folder)
    exported = optimum_export(python, folder, root)
    cmd = [sys.executable, "-m", "exporter.cli", "bench", *map(str, args.bundles), "--out", str(args.out),
           "--optimum", str(exported), "--optimum-python", str(python), "--rounds", str(args.rounds),
           "--decode-tokens", str(args.decode_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
