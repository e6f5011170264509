"""The microcontroller target: distillation, int8-full conversion, C arrays, TFLite Micro arena, budgets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exporter.errors import BudgetExceeded, SlmExportError, UnsupportedRecipeError
from exporter.mcu import data, distill, tflm
from exporter.pipeline import ExportRequest, run

# A handful of intents (OVOS weather / volume / time + drone) so the run takes seconds, not minutes.
INTENTS = ["ovos.current_weather", "ovos.what.time.is.it", "ovos.is_rain", "drone.takeoff", "drone.land",
           "drone.turn_left", "drone.photo"]
STUDENT = {"intents": INTENTS, "epochs": 15, "max_per_intent": 60}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mcu-cache")


@pytest.fixture(scope="module")
def bundle_dir(cache_dir, tmp_path_factory):
    """One real run of the mcu pipeline (distil + convert + TFLite Micro) on the small intent set."""
    out = tmp_path_factory.mktemp("mcu") / "bundle"
    manifest = run(ExportRequest(target="mcu", out=out, cache_dir=cache_dir, extra={"student": STUDENT}))
    assert manifest == json.loads((out / "manifest.json").read_text())
    return out


def _manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def test_split_is_by_template_and_expands_alternations():
    cs = data.build(INTENTS, max_per_intent=60)
    assert set(cs.intents) == set(INTENTS)
    assert not {e.group for e in cs.train} & {e.group for e in cs.test}
    assert {e.intent for e in cs.train} == set(INTENTS)
    rng = __import__("random").Random(0)
    assert data.expand("(take|grab) a (shot|pic) (now|)", rng) == sorted(
        f"{a} a {b}{c}" for a in ("take", "grab") for b in ("shot", "pic") for c in (" now", ""))
    assert all("{" not in t for t in data.expand("fly up {n} meters", rng))
    assert data.normalize("Fly UP 15 meters, then five!") == ["fly", "up", "<num>", "meters", "then", "<num>"]


def test_distilled_student_is_small_and_learns(bundle_dir, cache_dir):
    fig = _manifest(bundle_dir)["distillation"]
    assert fig["parameters"] < 300_000
    assert fig["intents"] == len(INTENTS) and fig["test_examples"] > 0
    # Chance is 1/7: both models must really classify the held-out phrasings.
    assert fig["teacher_accuracy"] > 0.6
    assert fig["student_float_accuracy"] > 0.6
    # The student was cached under <cache>/mcu/<key> and is reused, not retrained.
    cfg = distill.StudentConfig(**STUDENT)
    d, folder, cached = distill.get_or_train(cfg, cache_dir)
    assert cached and folder.parent == cache_dir / "mcu"
    assert d.figures == fig


def test_bundle_is_int8_full_and_parity_is_measured_in_tflm(bundle_dir):
    from ai_edge_litert.interpreter import Interpreter

    m = _manifest(bundle_dir)
    for name in ("model.tflite", "model_data.h", "model_data.cc", "intent_vocab.h", "intent_vocab.cc", "labels.txt",
                 "report.md"):
        assert (bundle_dir / name).exists(), name
    model = (bundle_dir / "model.tflite").read_bytes()
    it = Interpreter(model_content=model)
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    p = m["parity"]
    assert p["runtime"] == "tflite-micro" and p["passed"]
    assert p["metrics"]["examples"] == m["distillation"]["test_examples"]
    assert p["metrics"]["top1_agreement"] >= 0.8
    assert (bundle_dir / "labels.txt").read_text().split() == INTENTS
    assert m["flash"]["model_bytes"] == len(model)
    assert m["artifact"]["bytes"] == len(model) and m["budget_failures"] == []
    assert (m["board"], m["budget"]) == ("cortex-m4", {"flash_bytes_max": 1 << 20, "ram_bytes_max": 256 << 10})


def test_report_renders_the_mcu_figures(bundle_dir):
    """report.md / report.html come from exporter.report like every bundle's, with the mcu's figures."""
    m, md = _manifest(bundle_dir), (bundle_dir / "report.md").read_text()
    assert md.startswith("# Intent classifier -> tflite / int8-full for mcu (cortex-m4)")
    for text in ("## Held-out accuracy", "student int8-full (TFLite Micro)", "## Parity against the float32 student",
                 "top-1 agreement", f"| flash: total | {m['flash']['total_bytes']} | {1 << 20} |",
                 f"| {m['arena']['total']} | {256 << 10} |", "a run with exactly that arena succeeded", "## Files"):
        assert text in md, text
    html = (bundle_dir / "report.html").read_text()
    assert "<h2>Memory</h2>" in html and f"<td>{m['flash']['total_bytes']}<td>{1 << 20}" in html


def test_c_array_compiles_to_the_tflite_bytes(bundle_dir, tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on this machine")
    for name in ("model_data.cc", "intent_vocab.cc"):
        shutil.copy(bundle_dir / name, tmp_path / name)
        shutil.copy(bundle_dir / name.replace(".cc", ".h"), tmp_path / name.replace(".cc", ".h"))
    (tmp_path / "dump.cc").write_text("""
#include <stdio.h>
#include "model_data.h"
#include "intent_vocab.h"
int main(int argc, char** argv) {
  if (argc > 2) {  // the word ids of argv[2], then the checksum of its int8 input
    int ids[kSeqLen];
    static int8_t input[kSeqLen * kEmbedDim];
    intent_tokenize(argv[2], ids);
    intent_embed(ids, input);
    long sum = 0;
    for (int i = 0; i < kSeqLen * kEmbedDim; ++i) sum += (long)input[i] * (i % 7 + 1);
    for (int i = 0; i < kSeqLen; ++i) printf("%d ", ids[i]);
    printf("%ld\\n", sum);
    return 0;
  }
  if (argc > 1) {  // the vocabulary, in id order, one word a line
    for (int id = 0; id < kVocabSize; ++id)
      for (int i = 0; i < kVocabSize; ++i)
        if (g_vocab_sorted_ids[i] == id) printf("%s\\n", g_vocab_sorted[i]);
    return 0;
  }
  fwrite(g_model_data, 1, g_model_data_len, stdout);
  return ((unsigned long)g_model_data % 16) != 0;  // TFLM needs the flatbuffer 16-byte aligned
}
""")
    for name in ("model_data", "intent_vocab", "dump"):
        subprocess.run([gcc, "-c", "-O1", "-Wall", "-Werror", f"{name}.cc", "-o", f"{name}.o"], cwd=tmp_path, check=True)
    subprocess.run([gcc, "model_data.o", "intent_vocab.o", "dump.o", "-o", "dump"], cwd=tmp_path, check=True)
    dumped = subprocess.run([str(tmp_path / "dump")], capture_output=True, check=True).stdout
    assert dumped == (bundle_dir / "model.tflite").read_bytes()
    words = subprocess.run([str(tmp_path / "dump"), "vocab"], capture_output=True, check=True, text=True).stdout
    assert words.splitlines() == (bundle_dir / "vocab.txt").read_text().splitlines()
    # The C tokenizer + embedding lookup equal the Python ones (the model input the parity check used).
    vocab = data.WordVocab.load(bundle_dir / "vocab.txt")
    table = _embedding_table(bundle_dir, len(vocab.words))
    for text in ("Take off NOW, drone!", "what's the weather in Paris", "turn left 90 degrees twice",
                 "zzz unknownword fly up fifteen meters and then land and take a picture please ok"):
        ids = vocab.encode(text, 16)
        x = table[ids].reshape(-1).astype(np.int64)
        expected = " ".join(map(str, ids)) + f" {int((x * (np.arange(x.size) % 7 + 1)).sum())}"
        got = subprocess.run([str(tmp_path / "dump"), "tok", text], capture_output=True, check=True, text=True).stdout
        assert got.strip() == expected, text


def _embedding_table(bundle_dir: Path, vocab_size: int) -> np.ndarray:
    """g_embedding parsed back from intent_vocab.cc."""
    import re

    cc = (bundle_dir / "intent_vocab.cc").read_text()
    body = re.search(r"g_embedding\[kVocabSize \* kEmbedDim\] = \{(.*?)\};", cc, re.S).group(1)
    values = np.array([int(v) for v in body.replace("\n", " ").split(",") if v.strip()], dtype=np.int8)
    return values.reshape(vocab_size, -1)


def test_arena_is_measured_and_sufficient(bundle_dir):
    model = (bundle_dir / "model.tflite").read_bytes()
    arena = tflm.measure_arena(model)
    assert arena == {k: v for k, v in _manifest(bundle_dir)["arena"].items() if k != "verified"}
    assert 0 < arena["head"] < arena["total"]
    assert _manifest(bundle_dir)["arena"]["verified"] and tflm.verify_arena(model, arena["total"])
    # Far too small an arena must fail (TFLM aborts the child process): the check can fail.
    assert not tflm.verify_arena(model, 256)


def test_tiny_budget_fails_clearly_and_writes_nothing(bundle_dir, cache_dir, tmp_path):
    from exporter.cli import _run_guarded

    out = tmp_path / "over"
    req = ExportRequest(target="mcu", out=out, cache_dir=cache_dir,
                        extra={"student": STUDENT, "ram_bytes_max": 1024, "flash_bytes_max": 4096})
    with pytest.raises(BudgetExceeded, match=r"tensor arena \d+ bytes > budget 1024 bytes") as e:
        run(req)
    assert "flash" in str(e.value) and not out.exists()
    assert not list(tmp_path.glob(".over.partial-*"))
    with pytest.raises(SystemExit) as exit_info:  # the CLI's error path: one message, non-zero exit
        _run_guarded(lambda: run(req), debug=False)
    assert exit_info.value.code == BudgetExceeded.exit_code != 0


def test_requests_the_target_cannot_honour(tmp_path):
    with pytest.raises(UnsupportedRecipeError, match="--model"):
        run(ExportRequest(target="mcu", out=tmp_path / "a", model="smollm2-135m-instruct"))
    with pytest.raises(UnsupportedRecipeError, match="int8-full"):
        run(ExportRequest(target="mcu", out=tmp_path / "b", recipe="fp32"))
    with pytest.raises(SlmExportError, match="unknown board"):
        run(ExportRequest(target="mcu", out=tmp_path / "c", extra={"board": "z80"}))


def test_budgets_check_flash_and_ram_of_the_chosen_board():
    from exporter.pipeline import resolve
    from targets import Budgets

    b = Budgets(flash_bytes_max=4096, ram_bytes_max=1024)
    assert b.failures({"flash_bytes": 4096, "arena_bytes": 1024}) == []
    assert b.failures({"flash_bytes": 5000, "arena_bytes": 2000}) == [
        "flash 5000 bytes > budget 4096 bytes", "tensor arena 2000 bytes > budget 1024 bytes"]
    assert b.failures({"decode_tok_s": 1.0}) == []  # a figure without a budget is not checked
    plan = resolve(ExportRequest(target="mcu", out=Path("o"), extra={"board": "cortex-m7", "ram_bytes_max": 99}))
    assert (plan.format, plan.recipe, plan.board) == ("tflite", "int8-full", "cortex-m7")
    assert (plan.budgets.flash_bytes_max, plan.budgets.ram_bytes_max) == (2 << 20, 99)
    assert resolve(ExportRequest(target="host", out=Path("o"), extra={"board": "z80"})).board is None


def test_no_import_cycle_and_listing_targets_imports_no_torch():
    """targets/ names the mcu stages without importing them; exporter/mcu never imports targets."""
    import ast
    import sys

    root = Path(__file__).resolve().parent.parent
    for path in (root / "exporter" / "mcu").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "targets" or n.startswith("targets.") for n in names), path.name
    code = ("import sys, exporter.cli; from targets import TARGETS; TARGETS.names(); "
            "bad = [m for m in ('torch', 'exporter.mcu.stages') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
