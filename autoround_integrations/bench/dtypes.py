"""MXFP / NVFP4 / FP8 / INT8-activation schemes on SmolLM2-135M-Instruct: perplexity of the quantized model in
memory (weights fake-quantized, activations quantized before every quantized linear as the scheme says), the
same weights with float activations, quantization time and the llm_compressor export size.

    python -m autoround.bench.dtypes [--schemes MXFP4,NVFP4,MXFP8,FP8_STATIC,INT8_W8A8] [--methods rtn,opt_rtn,light]
        [--rotations none,default,inplace,inplace_fold]

``--rotations``: ``default`` rotates each quantized layer's input online (block-32 Hadamard); ``inplace`` the
residual stream, folded, plus down_proj's input online (QuaRot; the reference's inplace default); ``inplace_fold``
the fold alone.  Rows with an online rotation write ``fake`` (llm_compressor cannot carry one), so their size
column is the fake checkpoint's.

Calibration and evaluation text and settings are ``vs_reference``'s (32 x 512 calibration tokens of gensim's
Wikipedia text, 40 x 512 held-out windows).  Each row runs in its own subprocess, one after the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .vs_reference import METHODS, SETTINGS, _emit, _peak_rss_gib, _perplexity, _prepare, _torch, run_worker

ROTATIONS = {  # name -> (rotation_config, export format)
    "none": (None, "llm_compressor"),
    "default": ("default", "fake"),
    "inplace": ({"backend": "inplace"}, "fake"),
    "inplace_fold": ({"backend": "inplace", "allow_online_rotation": False}, "llm_compressor"),
}


def worker(a: argparse.Namespace) -> None:
    torch = _torch()
    from autoround import AutoRound
    from autoround.quantizer import act_quant

    calib = torch.load(Path(a.workdir) / "calib.pt")
    windows = torch.load(Path(a.workdir) / "eval.pt")
    rotation, fmt = ROTATIONS[a.rotation]
    t0 = time.time()
    ar = AutoRound(a.model, scheme=a.scheme, dataset=list(calib), **METHODS[a.method].ours(),
                   nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"], batch_size=SETTINGS["batch_size"],
                   seed=SETTINGS["seed"], disable_model_free=True,
                   low_cpu_mem_usage=False, rotation_config=rotation)
    ar.quantize_and_save(a.out, format=fmt)
    seconds = time.time() - t0
    model = ar.model.eval()
    ppl = _perplexity(model, windows)
    for name in ar.layers:
        act_quant.remove(model.get_submodule(name))
    ppl_w = _perplexity(model, windows)
    size = sum(f.stat().st_size for f in Path(a.out).glob("*.safetensors"))
    _emit({"seconds": seconds, "peak_rss_gib": _peak_rss_gib(), "ppl": ppl, "ppl_float_acts": ppl_w,
           "size_mib": size / 2**20})


def _float_ppl(model: str, workdir: str) -> float:
    torch = _torch()
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return _perplexity(m, torch.load(Path(workdir) / "eval.pt"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.dtypes", description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="MXFP4,NVFP4,MXFP8,FP8_STATIC,INT8_W8A8")
    p.add_argument("--methods", default="rtn,opt_rtn,light")
    p.add_argument("--rotations", default="none", help=f"comma-separated subset of {', '.join(ROTATIONS)}")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rotation", default="none", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    for m in a.methods.split(","):
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    for r in a.rotations.split(","):
        if r not in ROTATIONS:
            p.error(f"unknown rotation {r!r}; valid: {', '.join(ROTATIONS)}")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="ar-bench-dtypes-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = _prepare(workdir)
    print(f"float perplexity: {_float_ppl(model, str(workdir)):.3f}", flush=True)
    print("| scheme | method | rotation | ppl (quantized activations) | ppl (float activations) | time s | "
          "peak RSS GiB | checkpoint MiB |\n|---|---|---|---|---|---|---|---|", flush=True)
    for scheme in a.schemes.split(","):
        for method in a.methods.split(","):
            for rot in a.rotations.split(","):
                out = workdir / f"{scheme}-{method}-{rot}"
                cmd = [sys.executable, "-m", "autoround.bench.dtypes", "--worker", "--scheme", scheme, "--method",
                       method, "--rotation", rot, "--model", model, "--out", str(out), "--workdir", str(workdir)]
                r = run_worker(cmd)
                if isinstance(r, str):
                    print(f"| {scheme} | {method} | {rot} | {r} |", flush=True)
                    continue
                print(f"| {scheme} | {method} | {rot} | {r['ppl']:.3f} | {r['ppl_float_acts']:.3f} | "
                      f"{r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['size_mib']:.1f} ({ROTATIONS[rot][1]}) |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
