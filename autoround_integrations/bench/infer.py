"""CPU inference benchmark: SmolLM2-135M W4A16 through transformers with this project's loader (per backend),
against the fp32 dense model and Intel's ``auto-round`` loader on the same checkpoint.

    python -m autoround.bench.infer --ref-python /work/venv-ref/bin/python

Each configuration runs in its own subprocess (``infer_worker.py``), so peak RSS is per configuration.
Prefill = tokens/s of one forward over a ``--prompt-len`` prompt (best of 2); decode = tokens/s over
``--new-tokens`` greedy steps with the KV cache, batch 1.  Checkpoints (group 64, which Intel's loader can
load, and group 128, whose ragged last group on SmolLM2's 576 channels only ours runs) are made once with
this project's RTN and kept under ``--work-dir``.  Intel's part runs with ``--ref-python``; when that
interpreter lacks auto-round-lib but this one has it, the same installed package is lent to it through
PYTHONPATH so Intel's best CPU backend (ark) is measured, not only its fp16 torch fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("infer_worker.py")


def _ensure_checkpoint(model: str, work_dir: Path, group_size: int) -> Path:
    out = work_dir / f"smollm2-w4a16-g{group_size}"
    if (out / "model.safetensors").exists():
        return out
    from autoround import AutoRound

    ar = AutoRound(model, scheme="W4A16", group_size=group_size, iters=0, disable_opt_rtn=True)
    ar.quantize_and_save(str(out), format="auto_round")
    return out


def _ark_shim() -> str | None:
    """A folder holding links to this interpreter's auto-round-lib (package + metadata), or None."""
    try:
        import auto_round_kernel
        from importlib.metadata import distribution
    except ImportError:
        return None
    shim = Path(tempfile.mkdtemp(prefix="ar-bench-ark-"))
    pkg = Path(auto_round_kernel.__file__).parent
    (shim / pkg.name).symlink_to(pkg)
    dist = distribution("auto-round-lib")
    info = Path(str(dist._path))  # the .dist-info folder
    (shim / info.name).symlink_to(info)
    return str(shim)


def _run(python: str, cfg: dict, timeout: float, extra_path: str | None = None) -> dict:
    if extra_path:
        cfg = {**cfg, "extra_path": extra_path}  # the worker puts it first on sys.path
    try:
        proc = subprocess.run([python, str(WORKER), json.dumps(cfg)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-300:]}


def _row(name: str, ckpt: str, res: dict, dense: dict | None) -> str:
    if "error" in res:
        return f"| {name} | {ckpt} | failed: {res['error']} | | | | |"
    ckpt = ckpt if ckpt.startswith("g") or ckpt == "-" else f"g{ckpt}"
    speed = ""
    if dense and "error" not in dense:
        speed = (f"{res['decode_tok_s'] / dense['decode_tok_s']:.2f}x / "
                 f"{res['decode_median_tok_s'] / dense['decode_median_tok_s']:.2f}x")
    rss = f"{res['peak_rss_mib']:.0f}"
    if dense and "error" not in dense:
        rss += f" ({res['peak_rss_mib'] / dense['peak_rss_mib']:.2f}x)"
    rss += f" / {res.get('model_mib', 0):.0f}"
    kern = ", ".join(f"{k}:{v}" for k, v in res.get("kernels", {}).items()) or "dense"
    return (f"| {name} | {ckpt} | {res['prefill_tok_s']:.1f} | {res['decode_tok_s']:.2f} / {res['decode_median_tok_s']:.2f} | "
            f"{speed} | {rss} | "
            f"{res['dtype']}, {kern} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="float model folder (default: SmolLM2-135M-Instruct fp32)")
    p.add_argument("--work-dir", default=None, help="where the W4A16 checkpoints are made/kept")
    p.add_argument("--backends", default="auto,avx2,ark", help="our backends to measure (comma separated)")
    p.add_argument("--ref-python", default=None, help="interpreter with Intel's auto-round (skipped when absent)")
    p.add_argument("--ref-backends", default="auto", help="Intel backends to measure (comma separated)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = p.parse_args(argv)

    from autoround import envs

    if args.model is None:
        from autoround.quantizer.assets import smollm2_folder

        args.model = str(smollm2_folder())
    work = Path(args.work_dir or os.path.join(envs.AR_CACHE_DIR, "bench-infer"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or os.cpu_count() or 1
    base = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": threads}
    g64, g128 = _ensure_checkpoint(args.model, work, 64), _ensure_checkpoint(args.model, work, 128)

    rows: list[tuple[str, str, dict]] = []
    dense = _run(sys.executable, {**base, "path": args.model, "loader": "dense", "dtype": "float32"}, args.timeout)
    rows.append(("fp32 dense", "-", dense))
    print(f"dense: {dense}", flush=True)
    for backend in [b for b in args.backends.split(",") if b]:
        for ckpt in (g64, g128):
            res = _run(sys.executable, {**base, "path": str(ckpt), "loader": "ours", "backend": backend}, args.timeout)
            rows.append((f"ours backend={backend}", ckpt.name.rsplit("-", 1)[-1], res))
            print(f"ours {backend} {ckpt.name}: {res}", flush=True)
    if args.ref_python:
        probe = subprocess.run([args.ref_python, "-c", "import auto_round_kernel"], capture_output=True)
        shim = _ark_shim() if probe.returncode != 0 else None
        for backend in [b for b in args.ref_backends.split(",") if b]:
            res = _run(args.ref_python, {**base, "path": str(g64), "loader": "intel", "backend": backend},
                       args.timeout, extra_path=shim)
            label = f"Intel auto-round backend={backend}" + (" (auto-round-lib lent)" if shim else "")
            rows.append((label, "g64", res))
            print(f"intel {backend}: {res}", flush=True)

    print()
    print(f"SmolLM2-135M-Instruct, W4A16 RTN, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"batch 1, {threads} thread(s)")
    print()
    print("| configuration | group | prefill tok/s | decode tok/s (mean / median step) | decode vs fp32 (mean / median) "
          "| peak RSS MiB (vs fp32) / model tensors MiB | dtype, kernels |")
    print("|---|---|---|---|---|---|---|")
    for name, ckpt, res in rows:
        print(_row(name, ckpt, res, dense if name != "fp32 dense" else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
