"""Serves the predictive-text page, the bundle's model and tokenizer, and onnxruntime-web's local files.

``python -m examples.predictive_text.web --bundle DIR [--port P]`` then open the printed URL. Only
loopback is bound. Everything the page needs comes from here (no CDN): the page (this folder's
index.html / *.js), ``/ort/*`` (node_modules/onnxruntime-web/dist, installed by ``npm ci``) and
``/bundle/{model.onnx,tokenizer.json,runtime.json}``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from examples.common import AppError, resolve_bundle

WEB = Path(__file__).resolve().parent
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
# ONNXRUNTIME_NODE_INSTALL=skip: transformers.js's onnxruntime-node would download CUDA libraries in its
# postinstall (its CPU build is in the npm package); the page needs neither.
NPM_CI = ["ONNXRUNTIME_NODE_INSTALL=skip", "npm", "ci", "--prefix", "examples/predictive_text/web"]
PAGE_FILES = {"index.html", "app.js", "tokenizer.js", "predictor.js"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".map": "application/json"}
_SAFE_NAME = re.compile(r"^[\w.-]+\Z")


def check_setup(bundle: Path) -> dict:
    """runtime.json of ``bundle`` if the page can run it and onnxruntime-web is installed; else AppError."""
    if not (ORT_DIST / "ort.wasm.min.mjs").exists():
        raise AppError(f"onnxruntime-web is not installed in {WEB / 'node_modules'}",
                       hint=f"run `{' '.join(NPM_CI)}` from the repository root (needs node/npm)")
    from exporter.runtime.base import RunnerError, artifact_path, read_spec, verify

    try:
        verify(bundle)  # sha256 of every file against the manifest, nothing undeclared, no symlinks
        spec = read_spec(bundle)
        artifact_path(bundle, spec)
    except RunnerError as e:
        raise AppError(str(e), hint="pass --bundle DIR of a folder written by `slm-export --format onnx ... --out DIR`"
                       ) from None
    if spec.get("format") != "onnx" or spec.get("kind") != "causal-lm":
        raise AppError(f"{bundle} holds a {spec.get('format')} {spec.get('kind')} model; the page runs onnx causal LMs",
                       hint="export one with `slm-export --target host --format onnx --out DIR`")
    if not (bundle / "tokenizer.json").is_file():
        raise AppError(f"{bundle} has no tokenizer.json", hint="re-export the bundle")
    return spec


class Handler(BaseHTTPRequestHandler):
    """GET only; a fixed set of files, never a path from the request joined to a folder unchecked."""

    def __init__(self, *args, bundle: Path, spec: dict, quiet: bool, words: bytes = b"[]", **kw):
        self.words = words
        self.bundle, self.spec, self.quiet = bundle, spec, quiet
        super().__init__(*args, **kw)

    def host_allowed(self) -> bool:
        """Only requests addressed to this loopback server: a page on another site that resolves its own
        name to 127.0.0.1 (DNS rebinding) sends its own Host header and is refused."""
        port = self.server.server_address[1]
        return self.headers.get("Host", "") in (f"127.0.0.1:{port}", f"localhost:{port}")

    def resolve(self, path: str) -> Path | None:
        from exporter.runtime.base import RunnerError, artifact_path
        from exporter.runtime.files import BundleFileError, bundle_path

        path = path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return WEB / "index.html"
        name = path.rsplit("/", 1)[-1]
        if not _SAFE_NAME.match(name):
            return None
        if path == f"/{name}" and name in PAGE_FILES:
            return WEB / name
        if path == f"/ort/{name}":
            return ORT_DIST / name
        try:
            if path == "/bundle/model.onnx":
                return artifact_path(self.bundle, self.spec)
            if path in ("/bundle/tokenizer.json", "/bundle/runtime.json"):
                return bundle_path(self.bundle, name)
        except (RunnerError, BundleFileError):
            return None
        return None

    def do_GET(self):  # noqa: N802 (http.server's name)
        if not self.host_allowed():
            self.send_error(421, "Misdirected Request: this server answers only to 127.0.0.1 / localhost")
            return
        if self.path.split("?", 1)[0] == "/bundle/words.json":
            self.send_body(self.words, ".json")
            return
        file = self.resolve(self.path)
        if file is None or not file.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", TYPES.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(file.stat().st_size))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        with file.open("rb") as f:
            try:
                shutil.copyfileobj(f, self.wfile)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page was closed mid-download

    def send_body(self, body: bytes, suffix: str) -> None:
        """A response built in memory (the word list)."""
        self.send_response(200)
        self.send_header("Content-Type", TYPES.get(suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def lexicon_json(bundle: Path) -> bytes:
    """The words suggestions may be (suggest.Lexicon on this bundle's tokenizer), for the page."""
    import json

    from tokenizers import Tokenizer

    from examples.common.detok import token_bytes_table
    from examples.predictive_text.suggest import Lexicon, shipped_texts
    from exporter.runtime.files import bundle_path

    tokenizer = Tokenizer.from_file(str(bundle_path(bundle, "tokenizer.json")))
    return json.dumps(sorted(Lexicon(token_bytes_table(tokenizer), shipped_texts()).words)).encode()


def serve(bundle: Path, port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    """A server (not yet serving) for the page on ``bundle``, bound to 127.0.0.1:``port`` (0: any free port)."""
    spec = check_setup(bundle)
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, bundle=bundle, spec=spec, quiet=quiet,
                                                                words=lexicon_json(bundle)))
    except OSError as e:
        raise AppError(f"cannot listen on 127.0.0.1:{port}: {e.strerror}", hint="pick another --port") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.predictive_text.web",
                                 description="Serve the predictive-text page for an ONNX bundle (localhost only).")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="onnx bundle folder (default: SmolLM2 onnx int8-dynamic, exported on first use)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--quiet", action="store_true", help="no request log")
    args = ap.parse_args(argv)
    try:
        httpd = serve(resolve_bundle(args.bundle), args.port, args.quiet)
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    # The test reads this line to learn the port.
    print(f"serving http://127.0.0.1:{httpd.server_address[1]}/", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0
