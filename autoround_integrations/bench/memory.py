"""Peak memory against depth: streamed tuning (low_cpu_mem_usage, the default) against loading the model.

    python -m autoround.bench.memory [--depths 4,16,64] [--hidden 1024] [--intermediate 2816]
                                     [--methods opt_rtn,iters2] [--routes streamed,in_memory]

Builds random-weight Llama folders of one width and several depths (float32 safetensors on disk, written
tensor by tensor), quantizes each to W4A16 (auto_round) with each method and route in its own subprocess, one
after the other, and reports each run's peak RSS (VmHWM), its time and the time per block.  With ``--plot`` a
PNG of peak RSS against depth is written next to the JSON results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {"rtn": (0, True), "opt_rtn": (0, False), "iters2": (2, False)}


def build_folder(path: Path, layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0) -> None:
    """A random-weight Llama folder (float32), never holding more than one tensor in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoround.quantizer.formats.writer import write_safetensors

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for name, p in skeleton.state_dict().items():
            if name.endswith("norm.weight"):
                yield name, 1.0 + 0.05 * torch.randn(p.shape, generator=gen)
            else:
                yield name, torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5)

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp, tensors(), 2 * 2**30)
    cfg.save_pretrained(str(tmp))
    tmp.rename(path)


def worker(a: argparse.Namespace) -> None:
    import torch

    from autoround import AutoRound
    from autoround.memory import peak_rss_gib

    iters, plain = METHODS[a.method]
    calib = [torch.randint(0, a.vocab, (a.seqlen,), generator=torch.Generator().manual_seed(i))
             for i in range(a.nsamples)]
    t0 = time.time()
    ar = AutoRound(a.model, scheme="W4A16", dataset=calib, iters=iters, disable_opt_rtn=plain,
                   nsamples=a.nsamples, seqlen=a.seqlen, batch_size=min(8, a.nsamples), amp=False,
                   low_cpu_mem_usage=a.route == "streamed",
                   disable_model_free=a.route != "streamed")  # plain RTN streamed is the model-free route
    ar.quantize_and_save(a.out, format="auto_round")
    seconds = time.time() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib()}), flush=True)


def _run(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = "\n".join((proc.stderr or "").splitlines()[-15:])
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{tail}")
    return json.loads(line[len("RESULT "):])


def add_folder_args(p: argparse.ArgumentParser, nsamples: int) -> None:
    """The random Llama folder's shape, the calibration size, and the worker's hidden arguments."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where the model folders are built and kept")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="4,16,64")
    p.add_argument("--methods", default="opt_rtn,iters2", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--routes", default="streamed,in_memory")
    add_folder_args(p, nsamples=8)
    p.add_argument("--results", default=None, help="JSON file of the rows (default: <workdir>/memory.json)")
    p.add_argument("--plot", action="store_true", help="also write peak RSS against depth as a PNG")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--route", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ar-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"| layers | method | route | peak RSS GiB | seconds | s/block |\n|---|---|---|---|---|---|", flush=True)
    for depth in [int(d) for d in a.depths.split(",")]:
        folder = work / f"llama-{a.hidden}x{depth}"
        if not folder.exists():
            build_folder(folder, depth, a.hidden, a.intermediate, a.vocab)
        for method in methods:
            for route in [r for r in a.routes.split(",") if r]:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                res = _run([sys.executable, "-m", "autoround.bench.memory", "--worker", "--method", method,
                            "--route", route, "--model", str(folder), "--out", str(out), "--vocab", str(a.vocab),
                            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)], a.timeout)
                row = {"layers": depth, "hidden": a.hidden, "intermediate": a.intermediate, "method": method,
                       "route": route, **res, "seconds_per_block": res["seconds"] / depth}
                rows.append(row)
                print(f"| {depth} | {method} | {route} | {res['peak_rss_gib']:.2f} | {res['seconds']:.1f} | "
                      f"{row['seconds_per_block']:.2f} |", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    results = Path(a.results) if a.results else work / "memory.json"
    results.write_text(json.dumps(rows, indent=1))
    if a.plot:
        _plot(rows, results.with_suffix(".png"))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["method"], r["route"]) for r in rows}):
        pts = sorted((r["layers"], r["peak_rss_gib"]) for r in rows if (r["method"], r["route"]) == key)
        ax.plot(*zip(*pts), marker="o", linestyle="-" if key[1] == "streamed" else "--", label=f"{key[0]}, {key[1]}")
    ax.set_xlabel("decoder layers (width %d)" % rows[0]["hidden"])
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
