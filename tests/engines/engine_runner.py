#!/usr/bin/env python
"""Runs a real inference engine on a checkpoint, in the engine's own virtualenv (a subprocess of the tests).

    python engine_runner.py vllm-generate   --model DIR --ids IDS.json --out OUT.json [--dtype float32]
    python engine_runner.py sglang-generate --model DIR --ids IDS.json --out OUT.json [--dtype float32]
    python engine_runner.py vllm-load       --model DIR [--dtype float32]

``*-generate`` writes ``{"tokens": [[...], ...], "texts": [...], "quant_method": str, "kernels": {...}}``:
greedy continuations (32 tokens, EOS ignored) of the given prompt token ids.  ``vllm-load`` only builds the
engine (for bad-checkpoint tests: the error is in the output and the exit status is non-zero).
Nothing here imports the test suite; the engine finds this project through its plugin entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets apply_model() inspect the model


def _vllm(args):
    from vllm import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        max_num_seqs=8,
        skip_tokenizer_init=args.skip_tokenizer,
    )


def _vllm_kernels(llm) -> tuple[str, dict]:
    """Quantization method and kernel counts, read from the engine's model when it lives in this process."""
    from autoround.vllm_integration import layer_report  # importable in the workers, unlike this script

    method = str(llm.llm_engine.vllm_config.model_config.quantization)
    kernels = llm.apply_model(layer_report)[0]
    return method, kernels


def vllm_generate(args) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = json.load(open(args.ids))
    t0 = time.time()
    llm = _vllm(args)
    t_load = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    t_gen = time.time() - t1
    method, kernels = _vllm_kernels(llm)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "quant_method": method,
        "kernels": kernels,
        "load_s": t_load,
        "generate_s": t_gen,
    }
    json.dump(result, open(args.out, "w"))
    print(f"engine_runner: quant_method={method} load {t_load:.1f}s generate {t_gen:.1f}s", flush=True)
    return 0


def vllm_load(args) -> int:
    _vllm(args)
    print("engine_runner: loaded", flush=True)
    return 0


def sglang_generate(args) -> int:
    import sglang as sgl

    ids = json.load(open(args.ids))
    t0 = time.time()
    engine = sgl.Engine(
        model_path=args.model,
        dtype=args.dtype,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        context_length=256,
        mem_fraction_static=0.5,
        random_seed=0,
        log_level="error",
    )
    try:
        t_load = time.time() - t0
        params = {"temperature": 0.0, "max_new_tokens": args.max_tokens, "ignore_eos": True}
        t1 = time.time()
        outs = engine.generate(input_ids=ids, sampling_params=params)
        t_gen = time.time() - t1
        method = str(engine.tokenizer_manager.server_args.quantization)
    finally:
        engine.shutdown()
    result = {
        "tokens": [list(o["output_ids"]) for o in outs],
        "texts": [o["text"] for o in outs],
        "quant_method": method,
        "kernels": {},
        "load_s": t_load,
        "generate_s": t_gen,
    }
    json.dump(result, open(args.out, "w"))
    print(f"engine_runner: quant_method={method} load {t_load:.1f}s generate {t_gen:.1f}s", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["vllm-generate", "vllm-load", "sglang-generate"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids")
    ap.add_argument("--out")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--skip_tokenizer", action="store_true", help="checkpoint without a tokenizer (token ids only)")
    args = ap.parse_args(argv)
    return {"vllm-generate": vllm_generate, "vllm-load": vllm_load, "sglang-generate": sglang_generate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
