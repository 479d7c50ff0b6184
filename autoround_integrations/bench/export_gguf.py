"""GGUF export benchmark: quantization time, export time and file size of SmolLM2 per GGUF file type.

    python -m autoround.bench.export_gguf [--formats gguf:q4_0,gguf:q4_k_m] [--disable_opt_rtn]
        [--nsamples 16] [--seqlen 512] [--eval_windows 0]

Optimized RTN (iters 0) with calibration text from the first 60% of gensim's Wikipedia articles; with
``--eval_windows N`` also prints the perplexity of the fake-quantized model on N held-out 512-token windows.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoround import AutoRound
    from autoround.quantizer.assets import smollm2_folder
    from autoround.quantizer.data import wikipedia_text
    from autoround.quantizer.eval import perplexity

    p = argparse.ArgumentParser(prog="python -m autoround.bench.export_gguf", description=__doc__.split("\n")[0])
    p.add_argument("--formats", default="gguf:q4_0,gguf:q4_k_m")
    p.add_argument("--disable_opt_rtn", action="store_true")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=0)
    args = p.parse_args(argv)

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = wikipedia_text()
    ids = tok(text[: int(len(text) * 0.6)], add_special_tokens=False)["input_ids"]
    calib = [ids[i : i + args.seqlen] for i in range(0, args.nsamples * args.seqlen, args.seqlen)]
    held = torch.tensor(tok(text[int(len(text) * 0.7) :], add_special_tokens=False)["input_ids"])
    rows = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        scheme = "BF16" if fmt in ("gguf:bf16", "gguf:f16") else fmt.replace("gguf:", "GGUF:").upper()
        ar = AutoRound(model, tok, scheme=scheme, iters=0, dataset=calib, nsamples=args.nsamples,
                       seqlen=args.seqlen, disable_opt_rtn=args.disable_opt_rtn)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            ar.quantize([fmt])
            t1 = time.time()
            (out,) = ar.save_quantized(os.path.join(tmp, "out"), format=fmt)
            t2 = time.time()
            (path,) = glob.glob(os.path.join(out, "*.gguf"))
            size = os.path.getsize(path)
        ppl = perplexity(ar.model, held, seqlen=512, n_windows=args.eval_windows, progress=False) if args.eval_windows else None
        rows.append((fmt, t1 - t0, t2 - t1, size, ppl))
    print(f"| format | quantize (s) | export (s) | file size (MiB) | bits/weight (whole file) | ppl |")
    print("| --- | --- | --- | --- | --- | --- |")
    n_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    for fmt, tq, te, size, ppl in rows:
        ppl_s = f"{ppl:.3f}" if ppl is not None else "-"
        print(f"| {fmt} | {tq:.1f} | {te:.1f} | {size / 2**20:.1f} | {8 * size / n_params:.2f} | {ppl_s} |")


if __name__ == "__main__":
    main()
