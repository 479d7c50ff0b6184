"""Side by side with Intel's ``auto-round`` on SmolLM2-135M-Instruct: perplexity, quantization time, peak RSS.

    python -m autoround.bench.vs_reference --ref-python /path/to/venv-with-auto-round/bin/python \\
        [--schemes W4G64,W4G128,W2G64,AUTO3,AUTO4.5,MXFP4,NVFP4,MXFP8,FP8_STATIC,INT8_W8A8,MXFP4_ROT] [--methods rtn,opt_rtn,light,light_ext,default]
        [--ref-cache FILE]

Installs nothing.  Both tools get identical calibration tokens (consecutive 512-token chunks of the first 60%
of gensim's shortened English Wikipedia dump) and the same settings (nsamples 32, seqlen 512, batch_size 4,
seed 42 unless ``--seed``, symmetric); perplexity is measured on 40 non-overlapping 512-token windows of the last 30%.  Every
quantization runs in its own subprocess (one after the other, never in parallel) so its wall time and peak RSS
are its own.  Our checkpoints are always loaded back from disk through transformers; the reference's group-64
checkpoints too (by default through our loader in float32: the reference's own loader forces float16 on a CPU,
which is about 40x slower here; ``--ref-loader reference`` uses it anyway), while its group-128 rows come from its in-memory
fake-quantized model because it cannot load its own group-128 SmolLM2 checkpoint (576 input features).

The reference's rows are deterministic for a seed, so ``--ref-cache`` keeps them in a JSON file keyed by its
version and the settings; our rows are always computed fresh.  Time ratios are printed only for pairs measured in
this invocation.

This file is also the worker script of both sides (``--worker ours|ref``); the reference side imports only
torch, transformers and Intel's ``auto_round``, never this project.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = {  # name -> (bits, group_size), or ("auto", avg_bits) for AutoScheme over AUTO_OPTIONS
    "W4G64": (4, 64),
    "W4G128": (4, 128),
    "W2G64": (2, 64),
    "AUTO3": ("auto", 3.0),
    "AUTO4.5": ("auto", 4.5),
    # low-bit float and activation-quantized presets (issue 15), exported as each tool's default format for them
    "MXFP4": ("preset", ("MXFP4", None)),
    "NVFP4": ("preset", ("NVFP4", None)),
    "MXFP8": ("preset", ("MXFP8", None)),
    "FP8_STATIC": ("preset", ("FP8_STATIC", None)),
    "INT8_W8A8": ("preset", ("INT8_W8A8", None)),
    "MXFP4_ROT": ("preset", ("MXFP4", "default")),  # with rotation_config="default" (block-32 Hadamard)
    # the residual stream rotated and folded into the weights, no online step (ours only: the reference's inplace
    # backend exports fake only)
    "MXFP4_RES": ("preset", ("MXFP4", {"backend": "inplace", "allow_online_rotation": False})),
    "W4G128_ROT": ("preset", ("W4A16", "default")),
    "W4G128_RES": ("preset", ("W4A16", {"backend": "inplace", "allow_online_rotation": False})),
}
AUTO_OPTIONS = ("W2A16G64", "W4A16", "W8A16")
METHODS = {  # name -> (iters, lr, disable_opt_rtn, enable_alg_ext)
    "rtn": (0, None, True, False),
    "opt_rtn": (0, None, False, False),
    "light": (50, 5e-3, False, False),
    "light_ext": (50, 5e-3, False, True),
    "default": (200, None, False, False),
}


def _scheme_kwargs(name: str, auto_scheme_cls, workdir: str) -> dict:
    """The scheme arguments of a row, the same for both tools (their AutoScheme classes share the API); an
    AutoScheme row calibrates on the text file both tools can read (``_prepare``)."""
    first, second = SCHEMES[name]
    if first == "preset":
        preset, rotation = second
        return {"scheme": preset, **({"rotation_config": rotation} if rotation else {})}
    if first == "auto":
        return {"scheme": auto_scheme_cls(avg_bits=second, options=AUTO_OPTIONS),
                "dataset": str(Path(workdir) / "calib.jsonl")}
    return {"scheme": "W4A16", "bits": first, "group_size": second, "sym": True}


def _format(name: str) -> str:
    """The export format of a row: ``auto_round`` (the reference's default for every float preset), except
    INT8_W8A8, which both tools write as ``llm_compressor`` (``auto_round`` holds no integer weights with
    quantized activations)."""
    return "llm_compressor" if SCHEMES[name] == ("preset", ("INT8_W8A8", None)) else "auto_round"


def _size_mib(folder: str) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


SETTINGS = {"nsamples": 32, "seqlen": 512, "batch_size": 4, "seed": 42, "eval_windows": 40}


def _peak_rss_gib() -> float:
    """The worker's own peak (``VmHWM``): ``ru_maxrss`` carries the spawning driver's peak across exec."""
    with open("/proc/self/status") as f:
        hwm = next((line for line in f if line.startswith("VmHWM:")), None)
    return int(hwm.split()[1]) / 2**20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


@__import__("functools").lru_cache(maxsize=None)
def _torch():
    import torch

    return torch


def _perplexity(model, windows) -> float:
    import math

    torch = _torch()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), 4):
            batch = windows[i : i + 4]
            logits = model(input_ids=batch).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


# -- workers ------------------------------------------------------------------------------------------------


def worker_ours(a: argparse.Namespace) -> None:
    torch = _torch()
    from autoround import AutoRound, AutoScheme

    iters, lr, plain, ext = METHODS[a.method]
    calib = torch.load(Path(a.workdir) / "calib.pt")
    t0 = time.time()
    ar = AutoRound(
        a.model, **{"dataset": list(calib), **_scheme_kwargs(a.scheme, AutoScheme, a.workdir)}, iters=iters, lr=lr,
        nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"], batch_size=SETTINGS["batch_size"],
        seed=a.seed, disable_opt_rtn=plain, enable_alg_ext=ext,
        **({"amp": False} if a.disable_amp else {}),
    )
    ar.quantize_and_save(a.out, format=_format(a.scheme))
    _emit({"seconds": time.time() - t0, "peak_rss_gib": _peak_rss_gib(), "size_mib": _size_mib(a.out)})


def worker_ours_eval(a: argparse.Namespace) -> None:
    torch = _torch()
    import autoround  # noqa: F401  (registers our loader)
    from transformers import AutoModelForCausalLM

    windows = torch.load(Path(a.workdir) / "eval.pt")
    model = AutoModelForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()
    _emit({"ppl": _perplexity(model, windows), "loaded_from": "disk (our loader)"})


def worker_ref(a: argparse.Namespace) -> None:
    """Intel's auto-round: quantize (and save), evaluate in memory for group 128."""
    torch = _torch()
    import auto_round
    from auto_round import AutoRound, AutoScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    iters, lr, plain, ext = METHODS[a.method]
    calib = torch.load(Path(a.workdir) / "calib.pt")
    in_memory = a.in_memory_eval
    t0 = time.time()
    kwargs = dict(
        **{"dataset": [row.unsqueeze(0) for row in calib], **_scheme_kwargs(a.scheme, AutoScheme, a.workdir)},
        iters=iters, nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"], batch_size=SETTINGS["batch_size"],
        seed=a.seed, device_map="cpu",
    )
    if ext:
        kwargs["enable_alg_ext"] = True
    if lr is not None:
        kwargs["lr"] = lr
    if plain:
        kwargs["disable_opt_rtn"] = True
    if a.disable_amp:
        kwargs["amp"] = False
    if "rotation_config" in kwargs:
        # the reference's model-free route (its plain-RTN default for a folder) drops rotation_config silently
        kwargs["disable_model_free"] = True
    model = tok = a.model
    if in_memory:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(a.model)
        kwargs["disable_model_free"] = True  # the model-free route keeps no in-memory model to evaluate
    ar = AutoRound(model, tokenizer=tok, **kwargs) if in_memory else AutoRound(model, **kwargs)
    staging = tempfile.mkdtemp(prefix=".ref_stage_", dir=str(Path(a.out).parent))
    result: dict = {"version": auto_round.__version__}
    if in_memory:
        qmodel, _ = ar.quantize()
        seconds = time.time() - t0
        rss = _peak_rss_gib()
        windows = torch.load(Path(a.workdir) / "eval.pt")
        qmodel = (qmodel if qmodel is not None else model).float().eval()
        result.update(ppl=_perplexity(qmodel, windows), loaded_from="in-memory fake-quantized model")
    else:
        ar.quantize_and_save(output_dir=staging, format=_format(a.scheme))
        seconds = time.time() - t0
        rss = _peak_rss_gib()
        found = [r for r, _, files in os.walk(staging) if "config.json" in files]
        if len(found) != 1:
            raise RuntimeError(f"cannot find the reference's checkpoint under {staging}: {found}")
        if os.path.isdir(a.out):  # this benchmark's own earlier checkpoint of the row (a re-run in the same workdir)
            shutil.rmtree(a.out)
        os.replace(found[0], a.out)
        result["size_mib"] = _size_mib(a.out)
    result.update(seconds=seconds, peak_rss_gib=rss)
    _emit(result)


def worker_ref_eval(a: argparse.Namespace) -> None:
    torch = _torch()
    from transformers import AutoModelForCausalLM

    windows = torch.load(Path(a.workdir) / "eval.pt")
    model = AutoModelForCausalLM.from_pretrained(a.out, dtype=torch.float32, device_map="cpu").eval()
    _emit({"ppl": _perplexity(model, windows), "loaded_from": f"disk (reference loader, {model.dtype})"})


# -- driver -------------------------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path) -> dict:
    # the workdir is the cwd: the reference writes its scratch space to ./ar_work_space
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=log.parent)
        f.write(proc.stdout)
    results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); see {log}")
    return json.loads(results[-1])


def _prepare(workdir: Path) -> str:
    torch = _torch()
    from transformers import AutoTokenizer

    from autoround.quantizer.assets import smollm2_folder
    from autoround.quantizer.data import wikipedia_text

    folder = str(smollm2_folder())
    if not (workdir / "calib.pt").exists():
        tok = AutoTokenizer.from_pretrained(folder)
        text = wikipedia_text()
        head, tail = text[: int(len(text) * 0.6)], text[int(len(text) * 0.7) :]
        seqlen, n = SETTINGS["seqlen"], SETTINGS["nsamples"]
        ids = torch.tensor(tok(head, add_special_tokens=False)["input_ids"])
        calib = ids[: n * seqlen].reshape(n, seqlen)
        ev = torch.tensor(tok(tail, add_special_tokens=False)["input_ids"])
        w = SETTINGS["eval_windows"]
        if ev.numel() < w * seqlen:
            raise RuntimeError(f"held-out text has {ev.numel()} tokens, fewer than {w} x {seqlen}")
        torch.save(calib.clone(), workdir / "calib.pt")
        # AutoScheme rows: the reference's AutoScheme takes a dataset name or a local json/jsonl file only, so
        # both tools read the same text from a file: nsamples chunks of 600 tokens (each tokenizes back to at
        # least seqlen tokens), tokenized and cut by each tool itself
        extra = 600
        chunks = ids[: n * extra].reshape(n, extra)
        with open(workdir / "calib.jsonl", "w") as f:
            for row in chunks:
                f.write(json.dumps({"text": tok.decode(row.tolist())}) + "\n")
        torch.save(ev[: w * seqlen].reshape(w, seqlen).clone(), workdir / "eval.pt")
    return folder


def _ref_version(ref_python: str) -> str:
    out = subprocess.run(
        [ref_python, "-c", "import auto_round, torch, transformers; "
         "print(auto_round.__version__, torch.__version__, transformers.__version__)"],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{ref_python} cannot import auto_round: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoround.bench.vs_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-python", help="interpreter of a virtualenv with Intel's auto-round")
    p.add_argument("--schemes", default="W4G64,W4G128,W2G64",
                   help="comma-separated subset of " + ", ".join(SCHEMES) + " (AUTO<bits>: AutoScheme over "
                        + ",".join(AUTO_OPTIONS) + "; default %(default)s)")
    p.add_argument("--methods", default="rtn,opt_rtn,light,default",
                   help="comma-separated subset of " + ", ".join(METHODS) + " (light_ext: light with "
                        "enable_alg_ext; default %(default)s)")
    p.add_argument("--ref-cache", default=None, help="JSON file caching the reference's rows (read and updated)")
    p.add_argument("--workdir", default=None, help="where tokens, checkpoints and logs go (default: a temp dir)")
    p.add_argument("--skip-ours", action="store_true", help="only the reference's rows (to fill the cache)")
    p.add_argument("--ref-loader", choices=["ours", "reference"], default="ours",
                   help="who loads the reference's saved checkpoints for perplexity: our loader in float32 "
                        "(default) or the reference's own, which forces float16 on CPU (about 40x slower here)")
    p.add_argument("--disable-amp", action="store_true",
                   help="both tools tune in float32 (amp=False) instead of under their default bf16 autocast")
    p.add_argument("--seed", type=int, default=SETTINGS["seed"],
                   help="both tools' seed (it draws SignRound's batches); another one than 42 shows how much a row "
                        "moves with the random stream alone")
    p.add_argument("--worker", choices=["ours", "ours-eval", "ref", "ref-eval"], help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--in-memory-eval", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        {"ours": worker_ours, "ours-eval": worker_ours_eval, "ref": worker_ref, "ref-eval": worker_ref_eval}[
            a.worker
        ](a)
        return 0

    schemes = [s for s in a.schemes.split(",") if s]
    methods = [m for m in a.methods.split(",") if m]
    bad = [s for s in schemes if s not in SCHEMES] + [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown scheme/method {bad}; schemes: {', '.join(SCHEMES)}; methods: {', '.join(METHODS)}")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="vs_reference_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    model = _prepare(workdir)
    here = os.path.abspath(__file__)
    ref_version = _ref_version(a.ref_python) if a.ref_python else None
    cache_path = Path(a.ref_cache) if a.ref_cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    worker_flags = (["--disable-amp"] if a.disable_amp else []) + ["--seed", str(a.seed)]
    rows = []
    for scheme in schemes:
        for method in methods:
            row = {"scheme": scheme, "method": method}
            if not a.skip_ours:
                out = workdir / f"ours-{scheme}-{method}"
                q = _run([sys.executable, here, "--worker", "ours", "--scheme", scheme, "--method", method,
                          "--model", model, "--out", str(out), "--workdir", str(workdir)] + worker_flags, log)
                e = _run([sys.executable, here, "--worker", "ours-eval", "--out", str(out), "--workdir", str(workdir)], log)
                row["ours"] = {**q, **e}
            if ref_version:
                settings = {**SETTINGS, "seed": a.seed, **({"amp": False} if a.disable_amp else {})}
                key = json.dumps([ref_version, scheme, method, settings], sort_keys=True)
                if key in cache:
                    row["ref"] = {**cache[key], "cached": True}
                else:
                    out = workdir / f"ref-{scheme}-{method}"
                    # it cannot load its own group-128 SmolLM2 layers (AutoScheme rows hold W4A16 g128 ones)
                    in_mem = SCHEMES[scheme][1] == 128 or SCHEMES[scheme][0] == "auto"
                    cmd = [a.ref_python, here, "--worker", "ref", "--scheme", scheme, "--method", method,
                           "--model", model, "--out", str(out), "--workdir", str(workdir)] + worker_flags
                    r = _run(cmd + (["--in-memory-eval"] if in_mem else []), log)
                    if not in_mem:
                        if a.ref_loader == "reference":
                            ev = _run([a.ref_python, here, "--worker", "ref-eval", "--out", str(out),
                                       "--workdir", str(workdir)], log)
                        else:
                            ev = _run([sys.executable, here, "--worker", "ours-eval", "--out", str(out),
                                       "--workdir", str(workdir)], log)
                            ev["loaded_from"] = "disk (our loader, float32)"
                        r.update(ev)
                    row["ref"] = {**r, "cached": False}
                    cache[key] = {k: v for k, v in r.items() if k != "cached"}
                    if cache_path:
                        cache_path.parent.mkdir(parents=True, exist_ok=True)
                        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
            rows.append(row)
            _print_row(row)
    print()
    print(_table(rows, ref_version))
    print(f"\nworkdir: {workdir} (log: {log})")
    return 0


def _fmt(side: dict | None, key: str, spec: str) -> str:
    return format(side[key], spec) if side and key in side else "-"


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _table(rows: list[dict], ref_version: str | None) -> str:
    head = ("| scheme | method | ppl ours | ppl ref | ppl ratio | time ours (s) | time ref (s) | time ratio "
            "| peak RSS ours (GiB) | peak RSS ref (GiB) | size ours (MiB) | size ref (MiB) |")
    lines = [f"reference: auto-round {ref_version or '(not run)'}", head, "|" + "---|" * 12]
    for r in rows:
        o, f = r.get("ours"), r.get("ref")
        ppl_ratio = f"{o['ppl'] / f['ppl']:.3f}" if o and f else "-"
        fresh = o and f and not f.get("cached")
        t_ratio = f"{o['seconds'] / f['seconds']:.2f}" if fresh else ("(cached ref)" if o and f else "-")
        lines.append(
            f"| {r['scheme']} | {r['method']} | {_fmt(o, 'ppl', '.3f')} | {_fmt(f, 'ppl', '.3f')} | {ppl_ratio} "
            f"| {_fmt(o, 'seconds', '.1f')} | {_fmt(f, 'seconds', '.1f')} | {t_ratio} "
            f"| {_fmt(o, 'peak_rss_gib', '.2f')} | {_fmt(f, 'peak_rss_gib', '.2f')} "
            f"| {_fmt(o, 'size_mib', '.1f')} | {_fmt(f, 'size_mib', '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
