"""Run by the llama-cpp-python virtualenv (AR_TEST_LLAMACPP_PYTHON): perplexity of a GGUF file in llama.cpp.

    python llamacpp_ppl.py MODEL.gguf WINDOWS.json   ->  prints one JSON line {"ppl": ..., "n_tokens": ...}

WINDOWS.json holds token-id windows (a list of lists); each window is evaluated from an empty context and
scored on its next-token predictions, as autoround.quantizer.eval.perplexity does.
"""

import json
import math
import sys

import numpy as np
from llama_cpp import Llama


def main(model_path: str, windows_path: str) -> None:
    windows = json.load(open(windows_path))
    n_ctx = max(len(w) for w in windows)
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = np.asarray(w[1:])
        total -= float(logp[np.arange(len(w) - 1), targets].sum())
        count += len(w) - 1
    print(json.dumps({"ppl": math.exp(total / count), "n_tokens": count}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
