"""SignRoundV2 (``enable_alg_ext``) part by part on SmolLM2-135M-Instruct: what each of its three parts adds.

    python -m autoround.bench.alg_ext [--schemes W2G64,W4G64] [--variants minmax,search,search_filtered,
        search_range,ext] [--iters 50] [--lr 5e-3] [--real-model FOLDER_OR_GGUF]

Variants (each one SignRound run, ours, from the same calibration tokens as ``vs_reference``):

- ``minmax``: the reference's plain SignRound (min/max tuning starts from each group's min/max, factors in [0, 1]);
- ``search``: the start alone: min/max tuning starts from the importance-weighted searched range
  (``init_range="search"``, part 1 of the extension);
- ``search_filtered``: the start and the outlier-filtered block loss (part 3; below 4 bits only), factors in [0, 1];
- ``search_range``: the start and the wider factor range [0, 2] (part 2), unfiltered loss;
- ``ext``: ``enable_alg_ext=True``, all three parts.

The two partial variants switch one part of ``enable_alg_ext`` off inside this benchmark's worker process (the
library has no option for half an extension).  Perplexity is that of the fake-quantized model in memory on
``vs_reference``'s 40 held-out 512-token windows; the time is the quantization's.  One subprocess per row, one
after the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .vs_reference import SCHEMES, SETTINGS, _emit, _peak_rss_gib, _perplexity, _prepare, _torch, run_worker

VARIANTS = {  # name -> (AutoRound arguments, parts switched off inside enable_alg_ext)
    "minmax": ({"init_range": "minmax"}, ()),
    "search": ({"init_range": "search"}, ()),
    "search_filtered": ({"enable_alg_ext": True}, ("range",)),
    "search_range": ({"enable_alg_ext": True}, ("filtered",)),
    "ext": ({"enable_alg_ext": True}, ()),
}
INT_SCHEMES = [name for name, (first, _) in SCHEMES.items() if isinstance(first, int)]


def _switch_off(parts: tuple[str, ...]) -> None:
    from autoround.quantizer import signround
    from autoround.quantizer.dtypes import integer

    if "range" in parts:  # the extension's factors stay in [0, 1]
        integer.ALG_EXT_FACTOR_RANGE = (0.0, 1.0)
    if "filtered" in parts:  # the block loss keeps every element
        plain = signround.masked_mse
        signround.masked_mse = lambda out, target, mask=None, drop_outliers=False: plain(out, target, mask, False)


def worker(a: argparse.Namespace) -> None:
    torch = _torch()
    from autoround import AutoRound

    kwargs, off = VARIANTS[a.variant]
    _switch_off(off)
    bits, group_size = SCHEMES[a.scheme]
    calib = torch.load(Path(a.workdir) / "calib.pt")
    t0 = time.time()
    ar = AutoRound(a.model, scheme="W4A16", bits=bits, group_size=group_size, sym=True, dataset=list(calib),
                   iters=a.iters, lr=a.lr, nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"],
                   batch_size=SETTINGS["batch_size"], seed=SETTINGS["seed"], disable_model_free=True,
                   low_cpu_mem_usage=False, **kwargs)
    model, _ = ar.quantize()
    seconds = time.time() - t0
    ppl = _perplexity(model.eval(), torch.load(Path(a.workdir) / "eval.pt"))
    _emit({"seconds": seconds, "peak_rss_gib": _peak_rss_gib(), "ppl": ppl})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.alg_ext", description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="W2G64", help=f"comma-separated subset of {', '.join(INT_SCHEMES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=50, help="SignRound iterations (default: the light recipe's 50)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--real-model", default=None, help="as vs_reference's --real-model")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    schemes, variants = a.schemes.split(","), a.variants.split(",")
    bad = [s for s in schemes if s not in INT_SCHEMES] + [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown scheme/variant {bad}; schemes: {', '.join(INT_SCHEMES)}; variants: {', '.join(VARIANTS)}")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="ar-bench-alg-ext-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = _prepare(workdir, a.real_model)
    print(f"iters {a.iters}, lr {a.lr}\n| scheme | variant | ppl | time s | peak RSS GiB |\n|---|---|---|---|---|",
          flush=True)
    for scheme in schemes:
        for variant in variants:
            cmd = [sys.executable, "-m", "autoround.bench.alg_ext", "--worker", "--scheme", scheme, "--variant",
                   variant, "--model", model, "--workdir", str(workdir), "--iters", str(a.iters), "--lr", str(a.lr)]
            r = run_worker(cmd)
            if isinstance(r, str):
                print(f"| {scheme} | {variant} | {r} |", flush=True)
                continue
            print(f"| {scheme} | {variant} | {r['ppl']:.3f} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
