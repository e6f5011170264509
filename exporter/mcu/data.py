"""Command datasets for the microcontroller intent classifier.

Two sources:
- Open Voice OS skill templates (``intents/ovos/*.intent``, Apache-2.0, vendored from the ovos-skill-*
  wheels: see intents/ovos/NOTICE.md): one intent per file, one template per line.
- A drone command set defined here, in the same template syntax.

Template syntax (Padatious / OVOS): ``(a|b|)`` alternations (an empty branch = optional) and
``{slot}`` placeholders filled from ``SLOT_FILLERS``. The held-out split is made by *template*
(grouped so that a template and its ``in {location}`` variant fall on the same side), never by
expansion, so the test sentences are phrasings the student never saw.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

OVOS_DIR = "intents/ovos"
NUM_TOKEN = "<num>"
PAD, UNK = "<pad>", "<unk>"

# Drone commands: intent -> templates (alternations and {n} slots expanded like the OVOS files).
DRONE_TEMPLATES: dict[str, list[str]] = {
    "drone.takeoff": [
        "(please|) take off (the drone|)", "lift off and hover", "fire up (the rotors|the motors) and take off",
        "up up and away", "start the mission", "take off", "(drone|) (take off|lift off|launch) (now|please|)",
        "start (flying|the flight)", "get (airborne|in the air)", "launch the drone", "(begin|start) takeoff",
        "go airborne"],
    "drone.land": [
        "(please|) land (the drone|) (now|)", "touch down", "come down (now|) and (land|park)",
        "land (right here|over there)", "end the flight and land", "land", "(land|touch down) (now|please|here|)",
        "(bring|put) the drone down", "(start|begin) landing", "land the drone", "set down (now|)",
        "come down and land"],
    "drone.up": [
        "(please|) go up", "raise (the drone|altitude) (by|) {n} meters", "climb to {n} meters", "move higher",
        "ascend", "fly up {n} meters", "(go|move|climb|ascend) up {n} (meters|metres|feet)",
        "(climb|ascend|rise) {n} meters", "gain {n} meters of altitude", "increase altitude by {n} (meters|feet)",
        "go higher", "fly higher by {n} meters"],
    "drone.down": [
        "(please|) go down", "lower (the drone|altitude) (by|) {n} meters", "descend to {n} meters", "move lower",
        "descend", "fly down {n} meters", "(go|move|descend|drop) down {n} (meters|metres|feet)",
        "(descend|drop|sink) {n} meters", "lose {n} meters of altitude", "decrease altitude by {n} (meters|feet)",
        "go lower", "fly lower by {n} meters"],
    "drone.forward": [
        "(please|) go forward", "fly (straight|) ahead {n} meters", "move to the front",
        "push forward {n} (feet|meters)", "forward", "fly forward {n} meters",
        "(go|move) forward {n} (meters|metres|feet)", "(advance|move ahead) {n} meters", "go straight ahead",
        "fly ahead (for|) {n} meters", "move forwards"],
    "drone.back": [
        "(please|) go back", "fly (straight|) back {n} meters", "move to the rear", "retreat {n} (feet|meters)",
        "backward", "fly backward {n} meters", "(go|move) (back|backwards|backward) {n} (meters|metres|feet)",
        "back up {n} meters", "reverse {n} meters", "fly back a bit", "move backwards"],
    "drone.turn_left": [
        "(please|) turn left", "(spin|rotate) (counterclockwise|anticlockwise)", "do a left turn",
        "left turn {n} degrees", "veer left", "turn left {n} degrees",
        "(rotate|turn|yaw|spin) left (by|) {n} degrees", "turn to the left", "rotate counterclockwise {n} degrees",
        "face left", "yaw left"],
    "drone.turn_right": [
        "(please|) turn right", "(spin|rotate) clockwise", "do a right turn", "right turn {n} degrees", "veer right",
        "turn right {n} degrees", "(rotate|turn|yaw|spin) right (by|) {n} degrees", "turn to the right",
        "rotate clockwise {n} degrees", "face right", "yaw right"],
    "drone.photo": [
        "(please|) take (a|one) (picture|photo)", "capture (this|the) (scene|view)",
        "take (a|another) (still|image)", "snap a picture (now|)", "click a photo",
        "take a (picture|photo|photograph|snapshot)", "(capture|snap|shoot) (a|an) (image|photo|picture)",
        "say cheese", "(take|grab) a (shot|pic) (now|)", "photograph (this|that|the view)", "camera snap"],
    "drone.video": [
        "(please|) record (a|) video", "(start|begin) the (video|camera) recording", "film (this|the view)",
        "capture video (now|)", "start a clip", "(start|begin) (recording|filming) (video|)", "record a video",
        "(shoot|film|capture) (some|a) (video|footage)", "turn on video recording", "roll the camera"],
    "drone.home": [
        "(please|) go home", "return to (your|the) (home point|landing pad)", "fly back to (me|the start)",
        "(abort|end) (the|) mission and return home", "head home", "return home", "(go|fly|come) (back|) home",
        "return to (base|the launch point|home)", "come back (here|to me)", "(head|fly) back to (base|start)",
        "return to launch"],
    "drone.hover": [
        "(please|) hover (here|)", "hold still", "stay where you are", "(pause|halt) (in the air|here)",
        "don't move", "hover", "(hover|stay|hold) (in place|here|still|position)",
        "(stop|freeze) (moving|) (and hover|)", "hold (your|the) (altitude|position)", "keep still",
        "wait (here|) in the air"],
}

SLOT_FILLERS = {
    "location": ["london", "paris", "new york", "berlin", "tokyo", "my town", "the city", "lisbon", "san francisco", "sydney",
                 "chicago", "madrid"],
    "date": ["christmas", "next friday", "june 5th", "new year's day", "my birthday", "monday", "the weekend", "march 3rd"],
    "offset": ["2", "three", "5", "ten", "a couple of", "12"],
    "n": ["1", "2", "3", "5", "10", "15", "20", "30", "45", "90", "180", "one", "two", "five", "ten", "twenty"],
}
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "fifteen", "twenty", "thirty", "forty", "fifty", "sixty", "ninety", "hundred"}
_GROUP_SLOTS = re.compile(r"\s*\b(?:in|for|at|on|of|from)?\s*\{\w+\}")


@dataclass
class Example:
    text: str
    intent: str
    group: str  # the template group (split unit)


@dataclass
class CommandSet:
    """Examples split by template group; ``intents`` fixes the label order."""

    intents: list[str]
    train: list[Example]
    test: list[Example]

    def labels(self, examples: list[Example]) -> list[int]:
        index = {name: i for i, name in enumerate(self.intents)}
        return [index[e.intent] for e in examples]


def ovos_templates() -> dict[str, list[str]]:
    """intent name -> template lines, read from the vendored OVOS ``.intent`` files (package data)."""
    root = resources.files("exporter.mcu").joinpath(OVOS_DIR)
    out = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".intent"):
            lines = [ln.strip() for ln in entry.read_text(encoding="utf-8").splitlines()]
            out["ovos." + entry.name[: -len(".intent")]] = [ln for ln in lines if ln and not ln.startswith("#")]
    return out


def all_templates() -> dict[str, list[str]]:
    return {**ovos_templates(), **DRONE_TEMPLATES}


def expand(template: str, rng: random.Random, max_fills: int = 3) -> list[str]:
    """Every alternation of ``template`` with each ``{slot}`` filled by up to ``max_fills`` random fillers."""
    parts = re.split(r"(\([^()]*\))", template)
    choices = [p[1:-1].split("|") if p.startswith("(") else [p] for p in parts]
    out = []
    for combo in itertools.product(*choices):
        text = " ".join("".join(combo).split())
        slots = re.findall(r"\{(\w+)\}", text)
        if not slots:
            out.append(text)
            continue
        for _ in range(max_fills):
            filled = re.sub(r"\{(\w+)\}", lambda m: rng.choice(SLOT_FILLERS.get(m.group(1), ["it"])), text)
            out.append(filled)
    return sorted(set(t for t in out if t))


def group_key(template: str) -> str:
    """Templates that differ only by a slot phrase (``... in {location}``) share a group."""
    return " ".join(_GROUP_SLOTS.sub("", template).lower().split())


def build(intents: list[str] | None = None, test_fraction: float = 0.2, max_per_intent: int = 240,
          seed: int = 0) -> CommandSet:
    """The command dataset: template groups of each intent split train/test, then expanded.

    ``intents`` selects a subset (default: all OVOS + drone intents). Every intent keeps at least one
    training group; intents with a single group have no test examples.
    """
    rng = random.Random(seed)
    templates = all_templates()
    names = sorted(templates) if intents is None else list(intents)
    unknown = [n for n in names if n not in templates]
    if unknown:
        raise KeyError(f"unknown intents: {unknown}")
    train, test = [], []
    for name in names:
        groups: dict[str, list[str]] = {}
        for t in templates[name]:
            groups.setdefault(group_key(t), []).append(t)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_test = int(round(len(keys) * test_fraction)) if len(keys) > 2 else 0
        for split, chosen in ((test, keys[:n_test]), (train, keys[n_test:])):
            examples = [Example(text, name, k) for k in chosen for t in groups[k] for text in expand(t, rng)]
            rng.shuffle(examples)
            cap = max_per_intent if split is train else max(1, max_per_intent // 3)
            split.extend(examples[:cap])
    return CommandSet(names, train, test)


def normalize(text: str) -> list[str]:
    """Lower-case words; digits and number words become ``<num>`` (the same rule the C side applies)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return [NUM_TOKEN if w.isdigit() or w in NUMBER_WORDS else w for w in words]


class WordVocab:
    """A word vocabulary: ``<pad>`` = 0, ``<unk>`` = 1, ``<num>`` = 2, then training words by frequency."""

    def __init__(self, words: list[str]):
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def from_texts(cls, texts: list[str], max_size: int = 2000, min_count: int = 1) -> "WordVocab":
        counts: dict[str, int] = {}
        for t in texts:
            for w in normalize(t):
                counts[w] = counts.get(w, 0) + 1
        specials = [PAD, UNK, NUM_TOKEN]
        ranked = sorted((w for w, c in counts.items() if c >= min_count and w not in specials),
                        key=lambda w: (-counts[w], w))
        return cls(specials + ranked[: max_size - len(specials)])

    def encode(self, text: str, length: int) -> list[int]:
        """Word ids of ``text``, truncated / right-padded with ``<pad>`` to ``length``."""
        ids = [self.index.get(w, 1) for w in normalize(text)][:length]
        return ids + [0] * (length - len(ids))

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.words) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "WordVocab":
        return cls(path.read_text(encoding="utf-8").splitlines())
