"""Open a bundle for the apps: runner, tokenizer, special tokens, chat template, context window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import SlmExportError
from exporter.runtime.base import RunnerError, open_runner, read_spec
from exporter.runtime.files import BundleFileError, bundle_path

# What the apps use when no --bundle is given: the README's host bundle, exported on first use.
DEFAULT_EXPORT = ["--target", "host", "--format", "onnx", "--recipe", "int8-dynamic"]
DEFAULT_NAME = "smollm2-135m-instruct-onnx-int8-dynamic"
# Measured first exports of DEFAULT_EXPORT (SmolLM2 download cached), for an honest estimate: 642 s with
# the latency stage and 407 s without (--no-latency) on a 2-core AMD EPYC VM shared with other jobs.
FIRST_EXPORT_NOTE = "about 7-11 min on a shared 2-core x86 VM (642 s measured); slm-export prints each stage"
# Context used when the bundle has no fixed one (dynamic-cache ONNX): enough for chat, bounded for speed.
DEFAULT_CONTEXT = 2048


class AppError(SlmExportError):
    """A demo app cannot start or go on (bad bundle, missing package, bad option)."""


@dataclass
class Bundle:
    """A causal-LM bundle opened for generation."""

    path: Path
    spec: dict
    runner: object
    tokenizer: object  # tokenizers.Tokenizer
    eos_ids: list[int]
    context: int  # tokens the runner can hold (the exported window, or the model's positions, capped)
    chat_template: str | None = None
    special: dict = field(default_factory=dict)  # bos_token / eos_token strings for templates
    _token_bytes: list | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings such as ``<|im_start|>`` are recognised)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def token_bytes(self) -> list:
        """Each token's bytes (None for special tokens), built once."""
        if self._token_bytes is None:
            from .detok import token_bytes_table

            self._token_bytes = token_bytes_table(self.tokenizer)
        return self._token_bytes

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` through the bundle's chat template (as transformers renders it)."""
        if not self.chat_template:
            raise AppError(f"{self.path} has no chat template",
                           hint="use an instruct model's bundle (its tokenizer_config.json or chat_template.jinja)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from exporter.limits import render_chat_template

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # The template comes from the bundle: sandboxed (no file or attribute access) and time-bounded.
        return render_chat_template(lambda: env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special),
            f"the chat template of {self.path}")


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: Path, tok_config: dict) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = tok_config.get("chat_template")
    if isinstance(tpl, list):  # named templates: take the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"] if tpl else None)
    return tpl


def open_bundle(path: Path, threads: int | None = None, context: int | None = None) -> Bundle:
    """Open the causal-LM bundle at ``path`` with its format's runner; ``context`` caps the window."""
    path = Path(path)
    try:
        spec = read_spec(path)
    except RunnerError as e:
        raise AppError(str(e), hint="pass --bundle DIR of a folder written by `slm-export ... --out DIR`") from None
    if spec.get("kind") != "causal-lm":
        raise AppError(f"{path} holds a {spec.get('kind')!r} model; these apps need a causal LM")
    if not (path / "tokenizer.json").exists():
        raise AppError(f"{path} has no tokenizer.json", hint="re-export the bundle from a model with a fast tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise AppError("the apps need the tokenizers package", hint="pip install tokenizers") from None
    try:
        runner = open_runner(path, spec, threads=threads)
    except RunnerError as e:
        raise AppError(f"cannot run {path}: {e}") from None
    tok_config = _read_json(path / "tokenizer_config.json")
    model_config = _read_json(path / "config.json")
    window = runner.max_context or model_config.get("max_position_embeddings") or DEFAULT_CONTEXT
    if runner.max_context is None:
        window = min(window, DEFAULT_CONTEXT)
    if context:
        window = min(window, context)
    special = {k: _token_str(tok_config.get(k)) or "" for k in ("bos_token", "eos_token")}
    try:
        tokenizer = Tokenizer.from_file(str(bundle_path(path, "tokenizer.json", "tokenizer")))
    except (BundleFileError, Exception) as e:  # tokenizers raises a bare Exception for a bad file
        raise AppError(f"cannot read the tokenizer {path / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}",
                       hint="re-export the bundle") from None
    return Bundle(path=path, spec=spec, runner=runner, tokenizer=tokenizer,
                  eos_ids=list(spec.get("eos_token_ids") or []), context=int(window),
                  chat_template=_chat_template(path, tok_config), special=special)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def default_bundle_dir() -> Path:
    """Where the default bundle lives: ``$SLM_BUNDLE``, else under the slm-export cache."""
    if os.environ.get("SLM_BUNDLE"):
        return Path(os.environ["SLM_BUNDLE"])
    cache = Path(os.environ.get("SLM_EXPORT_CACHE") or Path.home() / ".cache" / "slm-export")
    return cache / "bundles" / DEFAULT_NAME


def resolve_bundle(bundle: Path | None, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """``bundle`` if given; else the default bundle, exported once with slm-export if missing
    (minutes: see FIRST_EXPORT_NOTE)."""
    if bundle is not None:
        return Path(bundle)
    path = default_bundle_dir()
    if (path / "runtime.json").exists():
        return path
    log(f"no bundle given and {path} does not exist: exporting it once (slm-export {' '.join(DEFAULT_EXPORT)}): "
        f"{FIRST_EXPORT_NOTE}; later starts reuse it")
    argv = [sys.executable, "-m", "exporter.cli", *DEFAULT_EXPORT, "--out", str(path)]
    done = subprocess.run(argv)
    if done.returncode != 0 or not (path / "runtime.json").exists():
        raise AppError("exporting the default bundle failed (see the messages above)",
                       hint="export one yourself and pass --bundle DIR")
    return path
