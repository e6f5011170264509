"""Run inside llama.cpp's own environment (exporter/llama_cpp_peer.py): logits and tokens of a GGUF.

    python llama_cpp_worker.py MODEL.gguf REQUEST.json OUT.npz
    python llama_cpp_worker.py --quantize SRC.gguf DST.gguf TYPE     (TYPE: Q8_0, Q4_0, Q4_K_M, ...)

REQUEST.json: {"windows": [[token ids], ...], "text": "...", "threads": N}. OUT.npz holds
``logits_<i>`` (n, vocab) float32 for each window, evaluated from an empty cache, and ``text_ids``:
llama.cpp's own tokenization of ``text`` with the special tokens its GGUF metadata asks for.
It imports only numpy and llama_cpp: that environment has no slm-export.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def main(model_path: str, request_path: str, out_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    windows = request["windows"]
    n_ctx = max(len(w) for w in windows) + 8
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                n_threads=int(request.get("threads") or 2))
    arrays = {}
    for i, ids in enumerate(windows):
        llm.reset()
        llm.eval(ids)
        arrays[f"logits_{i}"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    arrays["text_ids"] = np.array(llm.tokenize(request["text"].encode("utf-8"), add_bos=True, special=False),
                                  dtype=np.int64)
    np.savez(out_path, **arrays)


def quantize(src: str, dst: str, type_name: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``, what llama-quantize calls) from ``src``.

    ``allow_requantize``: the source is itself quantized (the embedded Q4_1 GGUF); its weights are
    dequantized and quantized again, as llama-quantize --allow-requantize does.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {type_name} failed on {src}")


if __name__ == "__main__":
    if sys.argv[1] == "--quantize":
        quantize(*sys.argv[2:5])
    else:
        main(*sys.argv[1:4])
