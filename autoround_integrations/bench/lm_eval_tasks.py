"""lm-eval scores of SmolLM2 quantized by each method, on the two local tasks, through the command line.

    python -m autoround.bench.lm_eval_tasks [--schemes W4A16,W2A16G64] [--methods float,rtn,opt_rtn,light]
        [--limit N] [--workdir DIR]

Each row is one ``auto-round`` command in its own subprocess, one after the other: ``--eval`` on the float folder
for the float row, otherwise a quantization (``--format auto_round``) that ends with ``--tasks``, which evaluates
the checkpoint it wrote, loaded back through transformers.  The scores are read from the
``lm_eval_results.json`` each run writes; the time is the whole command (quantization plus evaluation).
Calibration: the CLI's default text (gensim's Wikipedia, the part before the held-out articles), with the
settings of the other benchmark rows (``vs_reference``): 32 samples of 512 tokens, batch size 4.
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

from autoround.quantizer.lmeval import LOCAL_TASKS, NEWS_TASK, RESULTS_FILE, WIKI_TASK

METHODS = {  # name -> CLI arguments of the quantization (None: the float model, evaluated as it is)
    "float": None,
    "rtn": ["--iters", "0", "--disable_opt_rtn"],
    "opt_rtn": ["--iters", "0"],
    "light": ["--iters", "50", "--lr", "5e-3"],
}
CALIBRATION = ["--nsamples", "32", "--seqlen", "512", "--batch_size", "4"]


def _row(folder: str, scheme: str, method: str, workdir: Path, limit: str | None) -> dict:
    out = workdir / f"{method}-{scheme}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "autoround.quantizer.cli", "--model", folder, "--tasks", ",".join(LOCAL_TASKS)]
    if limit:
        cmd += ["--limit", limit]
    if METHODS[method] is None:
        cmd += ["--eval", "--output_dir", str(out)]
    else:
        cmd += ["--scheme", scheme, *METHODS[method], *CALIBRATION, "--format", "auto_round", "--output_dir", str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads((out / RESULTS_FILE).read_text())
    res = record["results"]
    return {
        "scheme": "-" if METHODS[method] is None else scheme, "method": method, "seconds": seconds,
        "word_ppl": res[WIKI_TASK]["word_perplexity,none"], "bits_per_byte": res[WIKI_TASK]["bits_per_byte,none"],
        "acc": res[NEWS_TASK]["acc,none"], "lastword_ppl": res[NEWS_TASK]["perplexity,none"],
    }


def main(argv: list[str] | None = None) -> int:
    from autoround.quantizer.assets import smollm2_folder

    p = argparse.ArgumentParser(prog="python -m autoround.bench.lm_eval_tasks", description=__doc__.split("\n")[0])
    p.add_argument("--schemes", default="W4A16,W2A16G64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--limit", default=None, help="documents per task (default: all)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    folder = str(smollm2_folder())
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="ar-lmeval-"))
    rows = []
    print("| scheme | method | wikipedia word ppl | bits per byte | news last-word acc | last-word ppl | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        for scheme in ([None] if METHODS[method] is None else a.schemes.split(",")):
            r = _row(folder, scheme or "-", method, workdir, a.limit)
            rows.append(r)
            print(f"| {r['scheme']} | {r['method']} | {r['word_ppl']:.3f} | {r['bits_per_byte']:.4f} | "
                  f"{r['acc']:.4f} | {r['lastword_ppl']:.2f} | {r['seconds']:.0f} |", flush=True)
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
