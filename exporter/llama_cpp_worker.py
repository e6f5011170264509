"""Run inside llama.cpp's own environment (exporter/llama_cpp_peer.py): logits and tokens of a GGUF.

    python llama_cpp_worker.py MODEL.gguf REQUEST.json OUT.npz

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


if __name__ == "__main__":
    main(*sys.argv[1:4])
