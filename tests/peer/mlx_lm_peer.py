"""Runs in mlx-lm's own virtualenv (AR_TEST_MLX_PYTHON): loads MLX folders with ``mlx_lm.load`` and greedy-decodes
prompts.  ``mlx_lm_peer.py OUT.json PROMPTS.json NEW_TOKENS FOLDER...``: PROMPTS.json is a list of token-id lists;
OUT.json gets, per folder, the quantized layers mlx-lm built (name -> [bits, group_size]) and the greedy tokens,
decoded as mlx-lm's generate does (the prompt once, then one token per step through its KV cache)."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def greedy(model, ids, new_tokens):
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    out = []
    for _ in range(new_tokens):
        out.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([out[-1:]]), cache=cache)[0, -1]
    return out


def main():
    out_path, prompts_path, new_tokens, *folders = sys.argv[1:]
    prompts = json.loads(Path(prompts_path).read_text())
    result = {}
    for folder in folders:
        model, _tokenizer = load(folder)
        layers = {
            name: [m.bits, m.group_size]
            for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)
        }
        tokens = [greedy(model, p, int(new_tokens)) for p in prompts]
        result[folder] = {"quantized": layers, "tokens": tokens, "device": str(mx.default_device())}
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
