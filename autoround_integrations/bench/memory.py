"""Peak memory against depth: streamed tuning (low_cpu_mem_usage, the default) against loading the model.

    python -m autoround.bench.memory [--depths 4,16,64] [--hidden 1024] [--intermediate 2816]
                                     [--methods opt_rtn,iters2] [--routes streamed,in_memory]

Builds random-weight Llama folders of one width and several depths (float32 safetensors on disk, written
tensor by tensor), quantizes each to W4A16 (auto_round) with each method and route in its own subprocess, one
after the other, and reports each run's peak RSS (VmHWM), its time and the time per block.  With ``--plot`` a
PNG of peak RSS against depth is written next to the JSON results.

``--memory-limit GIB`` runs each worker inside a new memory cgroup with that limit and no swap (cgroup v1 or v2,
which must be writable here: root), and ``--offload auto,off`` runs it with the cached activations' offload as
decided (``auto``) and with ``AR_DISABLE_OFFLOAD=1`` (``off``); a worker the kernel kills for memory is reported
as such, with the group's peak charge.
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

from .. import envs

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


class MemoryGroup:
    """A new memory cgroup with ``limit`` bytes and no swap, for one worker; removed on exit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        v1 = Path("/sys/fs/cgroup/memory")
        self.v1 = v1.is_dir()
        self.folder = (v1 if self.v1 else Path("/sys/fs/cgroup")) / f"ar-bench-{os.getpid()}"

    def __enter__(self) -> "MemoryGroup":
        try:
            self.folder.mkdir()
            if self.v1:
                (self.folder / "memory.limit_in_bytes").write_text(str(self.limit))
                swap = self.folder / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(self.limit))
            else:
                (self.folder / "memory.max").write_text(str(self.limit))
                (self.folder / "memory.swap.max").write_text("0")
        except OSError as exc:
            raise SystemExit(f"--memory-limit needs a writable memory cgroup ({exc}); run as root") from None
        return self

    def enter_child(self) -> None:  # preexec_fn: the worker joins the group before it starts
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def peak_gib(self) -> float | None:
        path = self.folder / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")
        try:
            return int(path.read_text().strip()) / 2**30
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the group can be removed once its last process is gone
            try:
                self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _run(cmd: list[str], timeout: float, group: MemoryGroup | None = None, env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=group.enter_child if group is not None else None)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if group is not None and proc.returncode in (-9, 137) and line is None:
        return {"killed": "out of memory (SIGKILL inside the memory limit)"}
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
    p.add_argument("--memory-limit", type=float, default=None,
                   help="run each worker in a memory cgroup of this many GiB, without swap (needs root)")
    p.add_argument("--offload", default="auto", help="comma-separated, of auto (the cached activations' offload "
                   "as decided) and off (AR_DISABLE_OFFLOAD=1)")
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
    offloads = [o for o in a.offload.split(",") if o]
    if any(o not in ("auto", "off") for o in offloads):
        p.error(f"--offload takes auto and/or off, got {a.offload!r}")
    rows = []
    print("| layers | method | route | offload | peak RSS GiB | group peak GiB | seconds | s/block |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for depth in [int(d) for d in a.depths.split(",")]:
        folder = work / f"llama-{a.hidden}x{depth}"
        if not folder.exists():
            build_folder(folder, depth, a.hidden, a.intermediate, a.vocab)
        for method in methods:
            for route in [r for r in a.routes.split(",") if r]:
                for offload in offloads:
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [sys.executable, "-m", "autoround.bench.memory", "--worker", "--method", method,
                           "--route", route, "--model", str(folder), "--out", str(out), "--vocab", str(a.vocab),
                           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
                    env = envs.child_environment(AR_WORK_SPACE=str(work / "ws"),
                                                 AR_DISABLE_OFFLOAD=True if offload == "off" else None)
                    group_peak = None
                    if a.memory_limit:
                        with MemoryGroup(int(a.memory_limit * 2**30)) as group:
                            res = _run(cmd, a.timeout, group, env)
                            group_peak = group.peak_gib()
                    else:
                        res = _run(cmd, a.timeout, env=env)
                    row = {"layers": depth, "hidden": a.hidden, "intermediate": a.intermediate, "method": method,
                           "route": route, "offload": offload, "memory_limit_gib": a.memory_limit,
                           "group_peak_gib": group_peak, **res}
                    rows.append(row)
                    peak = f"{group_peak:.2f}" if group_peak is not None else "-"
                    if "killed" in res:
                        print(f"| {depth} | {method} | {route} | {offload} | killed: {res['killed']} | {peak} | "
                              "- | - |", flush=True)
                    else:
                        row["seconds_per_block"] = res["seconds"] / depth
                        print(f"| {depth} | {method} | {route} | {offload} | {res['peak_rss_gib']:.2f} | {peak} | "
                              f"{res['seconds']:.1f} | {row['seconds_per_block']:.2f} |", flush=True)
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
        pts = sorted((r["layers"], r["peak_rss_gib"]) for r in rows
                     if (r["method"], r["route"]) == key and "killed" not in r)
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
