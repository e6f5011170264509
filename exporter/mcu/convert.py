"""Student -> all-integer int8 .tflite -> C sources a TFLite Micro firmware project compiles directly.

Conversion: litert-torch converts the student's body (embedded words -> logits) to a float flatbuffer;
ai-edge-quantizer's full-integer static recipe (int8 weights and activations, ``static_wi8_ai8``),
calibrated on the training commands, makes every op int8 with int8 input and output. The word
embedding table is quantized with the model input's scale / zero point and written as C data, so
firmware turns words into the model's int8 input with a table lookup.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from exporter.errors import ExportFailedError
from exporter.quiet import quiet

from . import data

# Ops whose int8 kernels TFLite Micro has and the int8-full model may contain.
INT8_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE",
            "TRANSPOSE", "SOFTMAX", "ADD", "MUL", "MEAN", "CONCATENATION", "STRIDED_SLICE", "SQUEEZE", "EXPAND_DIMS"}
MODEL_SYMBOL = "g_model_data"


def float_tflite(student, seq_len: int, dim: int) -> bytes:
    """The student's body (input float32 (1, seq_len, dim) embedded words) as a float flatbuffer."""
    import litert_torch
    import torch

    from .distill import Body

    sample = (torch.zeros(1, seq_len, dim),)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        path = Path(tmp) / "student_fp32.tflite"
        litert_torch.convert(Body.of(student), sample).export(str(path))
        return path.read_bytes()


def int8_full(fp32: bytes, calibration: np.ndarray) -> bytes:
    """Full-integer int8 flatbuffer calibrated on ``calibration`` (n, seq_len, dim) float32 inputs."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    sig = Interpreter(model_content=fp32).get_signature_list()
    (sig_name, io_names), = sig.items()
    (input_name,) = io_names["inputs"]
    samples = [{input_name: calibration[i:i + 1].astype(np.float32)} for i in range(len(calibration))]
    try:
        with quiet():
            q = quantizer.Quantizer(bytearray(fp32), recipe.static_wi8_ai8())
            result = q.calibrate({sig_name: samples}, num_threads=1)
            out = bytes(q.quantize(result, enable_progress_bar=False, enable_progress_report=False).quantized_model)
    except Exception as e:  # ai-edge-quantizer raises ValueError/RuntimeError on ops it cannot handle
        raise ExportFailedError(f"ai-edge-quantizer could not make the student all-integer: {type(e).__name__}: {e}",
                                hint="the student uses only CONV/MAX_POOL/FULLY_CONNECTED; check the litert-torch version") from None
    check_all_integer(out)
    return out


def check_all_integer(model: bytes) -> list[str]:
    """Op names of ``model``; raises if an input/output or an op's input is not integer (a float island)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    bad = [f"{d['name']} is {np.dtype(d['dtype']).name}" for d in it.get_input_details() + it.get_output_details()
           if np.dtype(d["dtype"]) != np.int8]
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = []
    for op in it._get_ops_details():  # noqa: SLF001 - the only op listing ai-edge-litert offers
        if op["op_name"] == "DELEGATE":  # XNNPACK's node wrapping the graph, not a model op
            continue
        ops.append(op["op_name"])
        floats = [i for i in op["inputs"] if i >= 0 and np.dtype(tensors[i]["dtype"]).kind == "f"]
        if floats or op["op_name"] not in INT8_OPS:
            bad.append(f"op {op['op_name']} ({'float input' if floats else 'not in the int8 op set'})")
    if bad:
        raise ExportFailedError("the int8-full model is not all-integer: " + "; ".join(bad),
                                hint="a layer ai-edge-quantizer keeps in float cannot run as int8 on a microcontroller")
    return ops


def io_quantization(model: bytes) -> dict:
    """Scale and zero point of the model's input and output (int8)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    q = lambda d: {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1]),
                   "shape": [int(x) for x in d["shape"]]}
    return {"input": q(inp), "output": q(out)}


def quantize_embeddings(table: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The float embedding table in the model input's int8 representation."""
    return np.clip(np.round(table / scale) + zero_point, -128, 127).astype(np.int8)


# ---------------------------------------------------------------- C sources


def _c_bytes(data: bytes, per_line: int = 12) -> str:
    rows = (", ".join(f"0x{b:02x}" for b in data[i:i + per_line]) for i in range(0, len(data), per_line))
    return "\n".join(f"    {r}," for r in rows)


def _c_ints(values, per_line: int = 16) -> str:
    values = [int(v) for v in values]
    rows = (", ".join(str(v) for v in values[i:i + per_line]) for i in range(0, len(values), per_line))
    return "\n".join(f"    {r}," for r in rows)


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_model_c(model: bytes, out_dir: Path) -> list[str]:
    """model_data.h / model_data.cc: the flatbuffer as a 16-byte aligned array (TFLM needs the alignment)."""
    (out_dir / "model_data.h").write_text(f"""// Generated by slm-export: the int8-full intent model for TensorFlow Lite Micro.
#ifndef SLM_EXPORT_MODEL_DATA_H_
#define SLM_EXPORT_MODEL_DATA_H_

extern const unsigned char {MODEL_SYMBOL}[];
extern const unsigned int {MODEL_SYMBOL}_len;

#endif  // SLM_EXPORT_MODEL_DATA_H_
""")
    (out_dir / "model_data.cc").write_text(f"""// Generated by slm-export: model.tflite as C data ({len(model)} bytes).
#include "model_data.h"

alignas(16) const unsigned char {MODEL_SYMBOL}[] = {{
{_c_bytes(model)}
}};
const unsigned int {MODEL_SYMBOL}_len = {len(model)};
""")
    return ["model_data.h", "model_data.cc"]


def write_vocab_c(words: list[str], embeddings_q: np.ndarray, intents: list[str], quant: dict, seq_len: int,
                  out_dir: Path) -> list[str]:
    """intent_vocab.h / .cc: the word list (sorted, for binary search), the int8 embedding rows, the labels."""
    order = sorted(range(len(words)), key=lambda i: words[i].encode())
    vocab_size, dim = embeddings_q.shape
    inp, out = quant["input"], quant["output"]
    (out_dir / "intent_vocab.h").write_text(f"""// Generated by slm-export: tokenizer and labels of the intent model.
//
// Tokenize like exporter/mcu/data.py: lower-case, split on anything but [a-z0-9'], map words of digits
// and number words (one, two, ... twenty, hundred) to "<num>", look each word up in g_vocab_sorted
// (binary search, strcmp order) -> id (g_vocab_sorted_ids), unknown words -> id 1 ("<unk>").
// Take the first kSeqLen ids, pad with id 0 ("<pad>"), and copy row g_embedding[id] (kEmbedDim int8
// values, already in the model input's scale / zero point) into the input tensor, word after word.
// The output is kNumIntents int8 scores; the argmax is the intent (g_intent_labels).
#ifndef SLM_EXPORT_INTENT_VOCAB_H_
#define SLM_EXPORT_INTENT_VOCAB_H_

#include <stdint.h>

constexpr int kVocabSize = {vocab_size};
constexpr int kSeqLen = {seq_len};
constexpr int kEmbedDim = {dim};
constexpr int kNumIntents = {len(intents)};
constexpr float kInputScale = {inp['scale']!r}f;
constexpr int kInputZeroPoint = {inp['zero_point']};
constexpr float kOutputScale = {out['scale']!r}f;
constexpr int kOutputZeroPoint = {out['zero_point']};

extern const char* const g_vocab_sorted[kVocabSize];
extern const uint16_t g_vocab_sorted_ids[kVocabSize];
extern const int8_t g_embedding[kVocabSize * kEmbedDim];
extern const char* const g_intent_labels[kNumIntents];

// Word ids of ``text`` (the rule above) in ``ids``, padded to kSeqLen; returns the number of words kept.
int intent_tokenize(const char* text, int ids[kSeqLen]);
// The model's int8 input (kSeqLen * kEmbedDim values) for ``ids``.
void intent_embed(const int ids[kSeqLen], int8_t* input);

#endif  // SLM_EXPORT_INTENT_VOCAB_H_
""")
    numbers = ", ".join(_c_string(w) for w in sorted(data.NUMBER_WORDS))
    (out_dir / "intent_vocab.cc").write_text(f"""// Generated by slm-export.
#include "intent_vocab.h"

#include <string.h>

const char* const g_vocab_sorted[kVocabSize] = {{
{chr(10).join("    " + _c_string(words[i]) + "," for i in order)}
}};
const uint16_t g_vocab_sorted_ids[kVocabSize] = {{
{_c_ints(order)}
}};
const int8_t g_embedding[kVocabSize * kEmbedDim] = {{
{_c_ints(embeddings_q.reshape(-1))}
}};
const char* const g_intent_labels[kNumIntents] = {{
{chr(10).join("    " + _c_string(n) + "," for n in intents)}
}};

static const char* const kNumberWords[] = {{{numbers}}};

static int word_id(const char* w) {{
  bool digits = true;
  for (const char* p = w; *p; ++p) digits = digits && *p >= '0' && *p <= '9';
  if (digits) return 2;  // "<num>"
  for (const char* n : kNumberWords) if (strcmp(n, w) == 0) return 2;
  int lo = 0, hi = kVocabSize - 1;
  while (lo <= hi) {{
    int mid = (lo + hi) / 2, c = strcmp(g_vocab_sorted[mid], w);
    if (c == 0) return g_vocab_sorted_ids[mid];
    if (c < 0) lo = mid + 1; else hi = mid - 1;
  }}
  return 1;  // "<unk>"
}}

int intent_tokenize(const char* text, int ids[kSeqLen]) {{
  char word[64];
  int n = 0, len = 0;
  bool too_long = false;
  for (const char* p = text;; ++p) {{
    char c = (*p >= 'A' && *p <= 'Z') ? (char)(*p - 'A' + 'a') : *p;
    if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '\\'') {{
      if (len < (int)sizeof(word) - 1) word[len++] = c; else too_long = true;
      continue;
    }}
    if (len > 0 && n < kSeqLen) {{
      word[len] = 0;
      ids[n++] = too_long ? 1 : word_id(word);
    }}
    len = 0;
    too_long = false;
    if (c == 0) break;
  }}
  for (int i = n; i < kSeqLen; ++i) ids[i] = 0;  // "<pad>"
  return n;
}}

void intent_embed(const int ids[kSeqLen], int8_t* input) {{
  for (int i = 0; i < kSeqLen; ++i) memcpy(input + i * kEmbedDim, g_embedding + ids[i] * kEmbedDim, kEmbedDim);
}}
""")
    return ["intent_vocab.h", "intent_vocab.cc"]
