"""MLX export benchmark: export time and size of SmolLM2 in the ``mlx`` format, and decode speed of mlx-lm on it
against this project's transformers load of the same weights (``auto_round:mlx``).

    python -m autoround.bench.mlx_export --mlx-python /path/to/mlx-venv/bin/python
        [--schemes W4A16G64,W2A16G64] [--new_tokens 64]

RTN (iters 0, no calibration). Decode speed: greedy tokens per second after a short prompt, the prompt's own
forward excluded, batch 1; mlx-lm through ``mlx_lm.stream_generate`` (its ``generation_tps``) in its own
virtualenv, ours through ``model.generate`` in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

PROMPT = "The history of the Roman Empire"

MLX_SCRIPT = """
import json, sys
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
model, tok = load(sys.argv[1])
last = None
for last in stream_generate(model, tok, sys.argv[2], max_tokens=int(sys.argv[3]), sampler=make_sampler(temp=0.0)):
    pass
print(json.dumps({"tps": last.generation_tps, "tokens": last.generation_tokens}))
"""


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if f.endswith(".safetensors"))


def our_decode_tps(folder: str, tok, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.time()
        model.generate(**ids, max_new_tokens=1, do_sample=False)
        prefill = time.time() - t0
        t0 = time.time()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.time() - t0
    return (out.shape[1] - ids["input_ids"].shape[1] - 1) / max(total - prefill, 1e-9)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from autoround import AutoRound
    from autoround.quantizer.assets import smollm2_folder

    p = argparse.ArgumentParser(prog="python -m autoround.bench.mlx_export", description=__doc__.split("\n")[0])
    p.add_argument("--mlx-python", required=True, help="python of a virtualenv with mlx[cpu] and mlx-lm")
    p.add_argument("--schemes", default="W4A16G64,W2A16G64")
    p.add_argument("--new_tokens", type=int, default=64)
    args = p.parse_args(argv)

    folder = str(smollm2_folder())
    tok = AutoTokenizer.from_pretrained(folder)
    float_bytes = folder_bytes(folder)
    rows = []
    for name in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        scheme = {"W4A16G64": ("W4A16", 64), "W2A16G64": ("W2A16G64", 64)}.get(name, (name, None))
        kw = {"group_size": scheme[1]} if scheme[1] else {}
        with tempfile.TemporaryDirectory() as tmp:
            ar = AutoRound(folder, scheme=scheme[0], iters=0, disable_opt_rtn=True, **kw)
            t0 = time.time()
            ar.quantize(["mlx", "auto_round:mlx"])
            t1 = time.time()
            (native,) = ar.save_quantized(os.path.join(tmp, "mlx"), format="mlx")
            t2 = time.time()
            (ours,) = ar.save_quantized(os.path.join(tmp, "ar"), format="auto_round:mlx")
            size = folder_bytes(native)
            r = subprocess.run([args.mlx_python, "-c", MLX_SCRIPT, native, PROMPT, str(args.new_tokens)],
                               capture_output=True, text=True, timeout=3600)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            mlx = json.loads(r.stdout.strip().splitlines()[-1])
            tps = our_decode_tps(ours, tok, args.new_tokens)
        rows.append((name, t1 - t0, t2 - t1, size, mlx["tps"], tps))
    print(f"float folder: {float_bytes / 2**20:.1f} MiB of safetensors")
    print("| scheme | quantize (s) | mlx export (s) | mlx size (MiB) | mlx-lm decode (tok/s) | ours, transformers (tok/s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, tq, te, size, mtps, otps in rows:
        print(f"| {name} | {tq:.1f} | {te:.1f} | {size / 2**20:.1f} | {mtps:.2f} | {otps:.2f} |")


if __name__ == "__main__":
    main()
