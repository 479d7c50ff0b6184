"""Time per block and peak memory per rank for 1 and N processes (torchrun, data-parallel calibration).

    python -m autoround.bench.distributed [--nprocs 1,2] [--layers 4] [--hidden 1024] [--intermediate 2816]
                                          [--iters 20] [--nsamples 16] [--seqlen 256] [--batch_size 8]

Builds (or reuses, in ``--workdir``) a random-weight Llama folder, quantizes it to W4A16 with SignRound once per
process count, one after the other (``torchrun --standalone --nproc_per_node N`` for N > 1, a plain process for
1), and reports the wall time, the time per block and each rank's peak RSS.  Every rank gets
``--threads`` / N intra-op threads (at least 1, ``torch.set_num_threads``), so the runs share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .memory import add_folder_args, build_folder


def worker(a: argparse.Namespace) -> None:
    import torch

    from autoround import AutoRound, envs
    from autoround.memory import peak_rss_gib

    torch.set_num_threads(a.threads)

    calib = [torch.randint(0, a.vocab, (a.seqlen,), generator=torch.Generator().manual_seed(i))
             for i in range(a.nsamples)]
    t0 = time.time()
    ar = AutoRound(a.model, scheme="W4A16", dataset=calib, iters=a.iters, nsamples=a.nsamples, seqlen=a.seqlen,
                   batch_size=a.batch_size, amp=False)
    ar.quantize_and_save(a.out, format="auto_round")
    print("RESULT " + json.dumps({"rank": envs.RANK or 0, "seconds": time.time() - t0,
                                  "peak_rss_gib": peak_rss_gib()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads shared by the ranks")
    add_folder_args(p, nsamples=16)
    p.add_argument("--results", default=None)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ar-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"llama-{a.hidden}x{a.layers}"
    if not folder.exists():
        build_folder(folder, a.layers, a.hidden, a.intermediate, a.vocab)
    rows = []
    print("| processes | threads each | seconds | s/block | peak RSS per rank GiB |\n|---|---|---|---|---|", flush=True)
    for n in [int(x) for x in a.nprocs.split(",") if x]:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        threads = max(1, a.threads // n)
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(n)]
        cmd = [*launcher, "-m", "autoround.bench.distributed", "--worker", "--model", str(folder), "--out", str(out),
               "--iters", str(a.iters), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
               "--batch_size", str(a.batch_size), "--vocab", str(a.vocab), "--threads", str(threads)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        results = [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or len(results) != n:
            print("\n".join(proc.stderr.splitlines()[-20:]), file=sys.stderr)
            return 1
        seconds = max(r["seconds"] for r in results)
        rss = [r["peak_rss_gib"] for r in sorted(results, key=lambda r: r["rank"])]
        rows.append({"processes": n, "threads": threads, "seconds": seconds, "launch_wall": wall,
                     "seconds_per_block": seconds / a.layers, "peak_rss_gib": rss, "iters": a.iters,
                     "nsamples": a.nsamples, "seqlen": a.seqlen, "hidden": a.hidden, "layers": a.layers})
        print(f"| {n} | {threads} | {seconds:.1f} | {seconds / a.layers:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in rss)} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    Path(a.results or work / "distributed.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
