"""Export time and checkpoint size per format, from one quantization of SmolLM2-135M.

    python -m autoround.bench.export [--scheme W4A16] [--group_size 128] [--asym] [--formats a,b,...]

Each format gets its own plain-RTN quantization (iters 0: its own layer plan, since a format keeps the layers it
cannot pack in float), then its write is timed (packing + safetensors + config + tokenizer files).  Formats that
cannot hold the scheme are listed as such.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def folder_size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf"))


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoround import AutoRound
    from autoround.quantizer.assets import smollm2_folder
    from autoround.quantizer.errors import AutoRoundError
    from autoround.quantizer.formats import get_format, list_formats

    p = argparse.ArgumentParser(prog="python -m autoround.bench.export", description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--formats", default=None, help="comma-separated (default: every registered format)")
    p.add_argument("--repeat", type=int, default=1, help="take the fastest of N writes per format")
    args = p.parse_args(argv)

    import copy

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    names = args.formats.split(",") if args.formats else list(list_formats())
    float_size = weights_size(str(folder))
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ar = AutoRound(copy.deepcopy(base), tok, scheme=args.scheme, group_size=args.group_size,
                           sym=False if args.asym else None, iters=0, disable_opt_rtn=True)
            try:
                ar.quantize(name)
            except AutoRoundError as exc:
                skipped[name] = str(exc).split(";")[0]
                continue
            best = float("inf")
            for i in range(args.repeat):
                out = os.path.join(tmp, f"{name.replace(':', '_')}-{i}")
                t0 = time.time()
                ar.save_quantized(out, format=name)
                best = min(best, time.time() - t0)
            rows.append((name, best, weights_size(out), folder_size(out), len(ar.layers), len(ar.plan.keep_float)))
            shutil.rmtree(out, ignore_errors=True)
            scheme = ar.scheme.describe()
    print(f"SmolLM2-135M {scheme} (plain RTN); float32 weights {float_size / 2**20:.1f} MiB; "
          f"torch threads {torch.get_num_threads()}")
    print()
    print(f"| {'format':<16} | {'export s':>8} | {'weights MiB':>11} | {'folder MiB':>10} | quantized / float layers |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 13}|{'-' * 12}|{'-' * 26}|")
    for name, sec, wsize, fsize, nq, nf in rows:
        print(f"| {name:<16} | {sec:>8.2f} | {wsize / 2**20:>11.1f} | {fsize / 2**20:>10.1f} | {nq:>4} / {nf:<19}|")
    for name, why in skipped.items():
        print(f"| {name:<16} | {'-':>8} | {'-':>11} | {'-':>10} | cannot hold the scheme: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
