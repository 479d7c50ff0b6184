"""Side by side with Intel's ``auto-round`` on SmolLM2-135M-Instruct (or ``--real-model``): perplexity,
quantization time, peak RSS, and the accuracy-per-minute front of both tools' named recipes.

    python -m autoround.bench.vs_reference --ref-python /path/to/venv-with-auto-round/bin/python \\
        [--schemes W4G64,W4G128,W2G64,AUTO3,AUTO4.5,MXFP4,NVFP4,MXFP8,FP8_STATIC,INT8_W8A8,MXFP4_ROT] [--methods rtn,opt_rtn,light,light_ext,default,recipe_light,recipe_default]
        [--ref-cache FILE] [--real-model FOLDER_OR_GGUF] [--plot FILE.png]

Installs nothing.  Both tools get identical calibration tokens (consecutive 512-token chunks of the first 60%
of gensim's shortened English Wikipedia dump) and the same settings (nsamples 32, seqlen 512, batch_size 4,
seed 42 unless ``--seed``, symmetric); perplexity is measured on 40 non-overlapping 512-token windows of the last 30%.  Every
quantization runs in its own subprocess (one after the other, never in parallel) so its wall time and peak RSS
are its own.  Our checkpoints are always loaded back from disk through transformers; the reference's group-64
checkpoints too (by default through our loader in float32: the reference's own loader forces float16 on a CPU,
which is about 40x slower here; ``--ref-loader reference`` uses it anyway), while its group-128 rows come from its in-memory
fake-quantized model because it cannot load its own group-128 SmolLM2 checkpoint (576 input features).

Most methods give both tools the same arguments.  ``recipe_light`` and ``recipe_default`` give each tool its own
named recipe instead (ours from ``autoround.quantizer.cli.RECIPES``, the reference's as it publishes them), and the
run ends with the accuracy-per-minute front: for each reference row, our fastest row of that scheme at or below its
perplexity and the time ratio.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Method:
    """A row's quantization settings: ``ref`` is what the reference is given; ours gets the same unless
    ``recipe`` names one of our CLI recipes (``autoround.quantizer.cli.RECIPES``), whose options it then takes
    (all but the protocol's ``SETTINGS``), while the reference runs its own recipe of that name."""

    ref: dict
    recipe: str | None = None

    def ours(self) -> dict:
        if self.recipe is None:
            return dict(self.ref)
        from autoround.quantizer.cli import RECIPES  # lazily: the reference's worker cannot import this project

        return {k: v for k, v in RECIPES[self.recipe].items() if k not in SETTINGS}


_REF_LIGHT = {"iters": 50, "lr": 5e-3}  # the reference's auto-round-light
_REF_DEFAULT = {"iters": 200}  # its auto-round (lr 1/iters)
METHODS = {
    "rtn": Method({"iters": 0, "disable_opt_rtn": True}),
    "opt_rtn": Method({"iters": 0}),
    "light": Method(_REF_LIGHT),
    "light_ext": Method({**_REF_LIGHT, "enable_alg_ext": True}),
    "default": Method(_REF_DEFAULT),
    # each tool's own named recipe: ours as our CLI defines it, the reference's as it publishes it
    "recipe_light": Method(_REF_LIGHT, recipe="light"),
    "recipe_default": Method(_REF_DEFAULT, recipe="default"),
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

    calib = torch.load(Path(a.workdir) / "calib.pt")
    t0 = time.time()
    ar = AutoRound(
        a.model, **{"dataset": list(calib), **_scheme_kwargs(a.scheme, AutoScheme, a.workdir)},
        nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"], batch_size=SETTINGS["batch_size"],
        seed=a.seed, **METHODS[a.method].ours(), **({"amp": False} if a.disable_amp else {}),
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

    calib = torch.load(Path(a.workdir) / "calib.pt")
    in_memory = a.in_memory_eval
    t0 = time.time()
    kwargs = dict(
        **{"dataset": [row.unsqueeze(0) for row in calib], **_scheme_kwargs(a.scheme, AutoScheme, a.workdir)},
        nsamples=SETTINGS["nsamples"], seqlen=SETTINGS["seqlen"], batch_size=SETTINGS["batch_size"],
        seed=a.seed, device_map="cpu", **METHODS[a.method].ref,
    )
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
    result = _result_of(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); see {log}")
    return result


def _result_of(stdout: str) -> dict | None:
    """A worker's last ``RESULT`` line (``_emit``), or None when it printed none."""
    results = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(results[-1]) if results else None


def run_worker(cmd: list[str]) -> dict | str:
    """Run a worker command of a benchmark that keeps going past a failed row: its result, or the last line of its
    stderr when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = _result_of(proc.stdout)
    if proc.returncode or result is None:
        return f"failed: {proc.stderr.strip().splitlines()[-1:]}"
    return result


def _model_folder(model: str | None, workdir: Path) -> str:
    """The float folder both tools read: the bundled SmolLM2 by default; a ``.gguf`` file is converted once to a
    float32 folder in the workdir (the reference reads folders, and both tools must start from the same
    weights)."""
    from autoround.quantizer.assets import smollm2_folder

    if model is None:
        return str(smollm2_folder())
    if not model.endswith(".gguf"):
        return model
    torch = _torch()
    from autoround.quantizer.formats.writer import atomic_output_dir
    from autoround.quantizer.model_io import load_model

    folder = workdir / ("model-f32-" + Path(model).stem)
    if not (folder / "config.json").exists():
        loaded, tokenizer = load_model(model, dtype=torch.float32)
        with atomic_output_dir(folder) as tmp:
            loaded.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    return str(folder)


def _prepare(workdir: Path, model: str | None = None) -> str:
    torch = _torch()
    from transformers import AutoTokenizer

    from autoround.quantizer.data import wikipedia_text

    folder = _model_folder(model, workdir)
    stamp = workdir / "model.txt"  # the tokens below are this model's: a workdir serves one model
    if stamp.exists() and stamp.read_text() != folder:
        raise RuntimeError(f"{workdir} holds the tokens of {stamp.read_text()}, not {folder}: use another --workdir")
    stamp.write_text(folder)
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
    p.add_argument("--real-model", default=None,
                   help="another real model than the bundled SmolLM2-135M-Instruct: a local float folder or a .gguf "
                        "file (converted once to a float32 folder in the workdir); a workdir holds one model's tokens")
    p.add_argument("--plot", default=None,
                   help="write a PNG of perplexity against minutes, both tools, one panel per scheme")
    p.add_argument("--from-results", default=None, metavar="FILE[,FILE...]",
                   help="run nothing: print the table and front of earlier runs' results.json files together (and "
                        "--plot them); the time ratios of rows from different invocations mean less")
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

    if a.from_results:
        loaded = [json.loads(Path(f).read_text()) for f in a.from_results.split(",")]
        rows, ref_version = [r for d in loaded for r in d["rows"]], loaded[0]["reference"]
        print(_table(rows, ref_version) + "\n\n" + _front(rows))
        if a.plot:
            _plot(rows, Path(a.plot), ref_version)
        return 0
    schemes = [s for s in a.schemes.split(",") if s]
    methods = [m for m in a.methods.split(",") if m]
    bad = [s for s in schemes if s not in SCHEMES] + [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown scheme/method {bad}; schemes: {', '.join(SCHEMES)}; methods: {', '.join(METHODS)}")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="vs_reference_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    model = _prepare(workdir, a.real_model)
    here = os.path.abspath(__file__)
    ref_version = _ref_version(a.ref_python) if a.ref_python else None
    cache_path = Path(a.ref_cache) if a.ref_cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    worker_flags = (["--disable-amp"] if a.disable_amp else []) + ["--seed", str(a.seed)]
    rows: list[dict] = []
    fresh: dict = {}  # the reference's rows measured in this invocation
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
                # keyed by what the reference is given, so light and recipe_light share one reference run
                key = json.dumps([ref_version, Path(model).name, scheme, METHODS[method].ref, settings], sort_keys=True)
                if key in fresh:
                    row["ref"] = {**fresh[key], "cached": False}
                elif key in cache:
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
                    fresh[key] = cache[key] = {k: v for k, v in r.items() if k != "cached"}
                    if cache_path:
                        cache_path.parent.mkdir(parents=True, exist_ok=True)
                        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
            rows.append(row)
            _print_row(row)
    print()
    print(_table(rows, ref_version))
    front = _front(rows)
    if front:
        print()
        print(front)
    (workdir / "results.json").write_text(json.dumps({"reference": ref_version, "rows": rows}, indent=1))
    if a.plot:
        _plot(rows, Path(a.plot), ref_version)
    print(f"\nworkdir: {workdir} (log: {log}; rows: {workdir / 'results.json'})")
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


def _front(rows: list[dict]) -> str:
    """For each reference row measured in this invocation: our fastest row of the same scheme (any method) whose
    perplexity is at or below it, and its time as a fraction of the reference's (the accuracy-per-minute front)."""
    refs: dict = {}
    for r in rows:
        f = r.get("ref")
        if f and not f.get("cached") and "ppl" in f:
            label = r["method"].replace("recipe_", "")
            refs.setdefault((r["scheme"], label, round(f["seconds"], 3)), f)
    if not refs:
        return ""
    lines = ["accuracy-per-minute front: our fastest row at or below each reference row's perplexity",
             "| scheme | reference row | ppl ref | time ref (s) | our fastest at <= ppl | ppl ours | time ours (s) "
             "| time ratio |", "|" + "---|" * 8]
    for (scheme, label, _), f in refs.items():
        ours = [(r["ours"]["seconds"], r["method"], r["ours"]["ppl"]) for r in rows
                if r["scheme"] == scheme and r.get("ours") and r["ours"]["ppl"] <= f["ppl"]]
        if ours:
            sec, method, ppl = min(ours)
            lines.append(f"| {scheme} | {label} | {f['ppl']:.3f} | {f['seconds']:.1f} | {method} | {ppl:.3f} "
                         f"| {sec:.1f} | {sec / f['seconds']:.2f} |")
        else:
            lines.append(f"| {scheme} | {label} | {f['ppl']:.3f} | {f['seconds']:.1f} | none | - | - | - |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, ref_version: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.6), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        for side, style, name in (("ref", "s--", f"auto-round {(ref_version or '').split()[0]}"),
                                  ("ours", "o-", "autoround (ours)")):
            pts = {}
            for r in rows:
                v = r.get(side)
                if r["scheme"] == scheme and v and "ppl" in v and "seconds" in v:
                    label = r["method"].replace("recipe_", "")
                    pts[label] = (v["seconds"] / 60, v["ppl"])
            if not pts:
                continue
            xs, ys = zip(*sorted(pts.values()))
            ax.plot(xs, ys, style, label=name)
            for label, (x, y) in pts.items():
                ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title(scheme)
        ax.set_xlabel("quantization wall time (min)")
        ax.set_ylabel("perplexity (40 x 512 held-out tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
