"""Export time and checkpoint size per format, from one quantization of SmolLM2-135M.

    python -m autoround.bench.export [--scheme W4A16] [--group_size 128] [--asym] [--formats a,b,...]

The model is quantized once (RTN, iters 0); then each format is written on its own and timed (packing +
writing, including the config and tokenizer files).  Formats that cannot hold the scheme are listed as such.
"""

from __future__ import annotations

import argparse
import os
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

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme=args.scheme, group_size=args.group_size, sym=False if args.asym else None,
                   iters=0, disable_opt_rtn=True)
    names = args.formats.split(",") if args.formats else list(list_formats())
    usable = []
    skipped = {}
    for name in names:
        try:
            ar._plan([get_format(name)])
            usable.append(name)
        except AutoRoundError as exc:
            skipped[name] = str(exc).split(";")[0]
    start = time.time()
    ar.quantize(",".join(usable))
    quant_s = time.time() - start
    float_size = weights_size(str(folder))
    print(f"SmolLM2-135M {ar.scheme.describe()}: quantized once (RTN) in {quant_s:.1f}s; "
          f"float32 weights {float_size / 2**20:.1f} MiB; torch threads {torch.get_num_threads()}")
    print()
    print(f"| {'format':<16} | {'export s':>8} | {'weights MiB':>11} | {'folder MiB':>10} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 13}|{'-' * 12}|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in usable:
            best = float("inf")
            for i in range(args.repeat):
                out = os.path.join(tmp, f"{name.replace(':', '_')}-{i}")
                t0 = time.time()
                ar.save_quantized(out, format=name)
                best = min(best, time.time() - t0)
            print(f"| {name:<16} | {best:>8.2f} | {weights_size(out) / 2**20:>11.1f} | "
                  f"{folder_size(out) / 2**20:>10.1f} |", flush=True)
    for name, why in skipped.items():
        print(f"| {name:<16} | {'-':>8} | {'-':>11} | {'-':>10} |  cannot hold the scheme: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
