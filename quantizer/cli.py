"""The ``auto-round`` command (also ``autoround``, ``auto-round-best``, ``auto-round-light``).

    auto-round --model M --scheme W4A16 --format auto_round --output_dir D [--iters 0] [--eval_ppl FILE]
    auto-round list format        # formats and the schemes each can hold
    auto-round list scheme

Errors print one line (``auto-round: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from .errors import AutoRoundError

# recipe -> option defaults (the reference tool's published recipes)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"iters": 200, "nsamples": 128, "lr": None},
    "best": {"iters": 1000, "nsamples": 512, "lr": None},
    "light": {"iters": 50, "nsamples": 128, "lr": 5e-3},
}


def build_parser(prog: str = "auto-round", recipe: str = "default") -> argparse.ArgumentParser:
    from .. import envs

    r = RECIPES[recipe]
    env_help = "\n".join(f"  {k}: {v}" for k, v in envs.describe_all().items())
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"Quantize a causal LM's weights to low-bit integers (recipe: {recipe}) and export a checkpoint.",
        epilog="subcommand: '%(prog)s list format' or '%(prog)s list scheme' prints what is available.\n\n"
        "environment variables:\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", "--model_name", "--model_name_or_path", dest="model",
                   help="local model folder, Hugging Face hub id, or .gguf file")
    g.add_argument("--output_dir", default="./tmp_autoround", help="where the checkpoint goes (default %(default)s)")
    g.add_argument("--format", "--formats", dest="format", default="auto_round",
                   help="export format(s), comma-separated (default %(default)s); see 'list format'")
    g.add_argument("--device_map", "--device", dest="device_map", default=None,
                   help="device for the model, e.g. cpu, cuda:0, auto (default: cpu)")
    g = p.add_argument_group("scheme")
    g.add_argument("--scheme", default="W4A16", help="preset scheme (default %(default)s); see 'list scheme'")
    g.add_argument("--bits", type=int, default=None, help="override the scheme's weight bits (2, 3, 4, 8)")
    g.add_argument("--group_size", type=int, default=None,
                   help="override the group size: -1 per output channel, 0 per tensor, N > 0 input channels per group")
    g.add_argument("--asym", action="store_true", help="asymmetric quantization (default: symmetric)")
    g.add_argument("--layer_config", default=None,
                   help="JSON dict of per-layer overrides, e.g. '{\"mlp.down_proj\": {\"bits\": 8}}' "
                        "(exact, regex or substring names; bits 16 keeps a layer in float)")
    g.add_argument("--ignore_layers", "--fp_layers", dest="ignore_layers", default="",
                   help="comma-separated layer names or patterns to keep in float")
    g.add_argument("--quant_lm_head", action="store_true", help="also quantize lm_head")
    g = p.add_argument_group("algorithm")
    g.add_argument("--iters", type=int, default=r["iters"],
                   help="SignRound iterations per block; 0 = round-to-nearest (default %(default)s)")
    g.add_argument("--lr", type=float, default=r["lr"], help="SignRound learning rate (default 1/iters)")
    g.add_argument("--minmax_lr", type=float, default=None, help="learning rate of the min/max scales (default lr)")
    g.add_argument("--disable_opt_rtn", action="store_true",
                   help="with --iters 0: plain RTN, no activation-weighted scale search and no calibration data")
    g.add_argument("--disable_model_free", action="store_true",
                   help="with --iters 0 --disable_opt_rtn: load the model and quantize it in memory instead of "
                        "streaming the folder's weights tensor by tensor (same checkpoint, more memory)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    g.add_argument("--low_gpu_mem_usage", action="store_true", help="keep cached activations off the accelerator")
    g.add_argument("--enable_torch_compile", action="store_true", help="torch.compile the tuning step")
    g.add_argument("--gradient_accumulate_steps", type=int, default=1,
                   help="batches whose gradients make one step (default %(default)s)")
    g.add_argument("--dynamic_max_gap", type=int, default=-1,
                   help="stop tuning a block after this many iterations without a better loss (default off)")
    g.add_argument("--enable_adam", action="store_true", help="AdamW instead of signed gradient descent")
    g.add_argument("--disable_amp", action="store_true",
                   help="tune in the model's own dtype instead of under bf16 autocast (the default, as the reference)")
    g.add_argument("--disable_minmax_tuning", action="store_true", help="do not tune the per-group min/max scales")
    g.add_argument("--init_range", choices=["auto", "minmax", "search"], default="auto",
                   help="where the min/max tuning starts: each group's min/max (the reference), optimized RTN's "
                        "searched range, or auto = searched for 2- and 3-bit layers (default %(default)s)")
    g.add_argument("--disable_quanted_input", action="store_true",
                   help="tune each block on float inputs instead of the quantized model's inputs")
    g.add_argument("--not_use_best_mse", action="store_true", help="keep the last iteration, not the best one")
    g.add_argument("--enable_deterministic_algorithms", action="store_true",
                   help="torch.use_deterministic_algorithms(True) (slower on some accelerators)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted SignRound run from its last finished block (same command and "
                        "settings; the result equals an uninterrupted run)")
    g = p.add_argument_group("calibration data")
    g.add_argument("--dataset", default="NeelNanda/pile-10k",
                   help="name[:split=..][:num=N][:concat=True], comma-separated; a hub id or a local "
                        ".txt/.json/.jsonl/.parquet file (offline, the default falls back to a packaged corpus)")
    g.add_argument("--nsamples", type=int, default=r["nsamples"], help="calibration samples (default %(default)s)")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample (default %(default)s)")
    g.add_argument("--batch_size", "--bs", dest="batch_size", type=int, default=8,
                   help="calibration batch size (default %(default)s)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_ppl", default=None, metavar="FILE",
                   help="print perplexity of the float model and of the saved checkpoint on this UTF-8 text "
                        "file ('wikipedia' = gensim's Wikipedia test articles)")
    g.add_argument("--eval_seqlen", type=int, default=512, help="perplexity window length (default %(default)s)")
    g.add_argument("--eval_windows", type=int, default=40, help="number of windows (default %(default)s)")
    return p


def _list(what: str) -> str:
    from .formats import get_format, list_formats
    from .schemes import PRESETS

    if what in ("format", "formats"):
        formats = list_formats()
        names = list(formats)
        width = max(len(n) for n in names) + 2
        lines = ["formats:"]
        for name, desc in formats.items():
            lines.append(f"  {name:<{width}}{desc}")
        lines.append("")
        lines.append("scheme x format (yes = can be exported; several formats: --format a,b,c):")
        col = max(max(len(n) for n in names), 3) + 2
        lines.append("  " + f"{'scheme':<12}" + "".join(f"{n:>{col}}" for n in names))
        for sname, scheme in PRESETS.items():
            cells = ["yes" if get_format(n).scheme_error(scheme) is None else "no" for n in names]
            lines.append(f"  {sname:<12}" + "".join(f"{c:>{col}}" for c in cells))
        return "\n".join(lines)
    if what in ("scheme", "schemes"):
        return "schemes:\n" + "\n".join(f"  {n:<10} {s.describe()}" for n, s in PRESETS.items())
    raise AutoRoundError(f"unknown list target {what!r}; valid: format, scheme")


def _eval_text(spec: str) -> str:
    from pathlib import Path

    from .data import wikipedia_text

    if spec == "wikipedia":
        text = wikipedia_text()
        return text[int(len(text) * 0.7) :]  # the held-out tail; calibration tools use the head
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AutoRoundError(f"--eval_ppl file {path} does not exist; pass a UTF-8 text file or 'wikipedia'")
    return path.read_text(encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    from ..api import AutoRound
    from .eval import text_perplexity

    model = args.model or args.model_pos
    if not model:
        raise AutoRoundError("no model given: pass --model FOLDER (or a hub id or .gguf file)")
    layer_config = None
    if args.layer_config:
        try:
            layer_config = json.loads(args.layer_config)
        except json.JSONDecodeError as exc:
            raise AutoRoundError(f"--layer_config is not valid JSON: {exc}") from None
        if not isinstance(layer_config, dict):
            raise AutoRoundError("--layer_config must be a JSON object of layer name -> settings")
    eval_text = _eval_text(args.eval_ppl) if args.eval_ppl else None
    ar = AutoRound(
        model,
        scheme=args.scheme,
        bits=args.bits,
        group_size=args.group_size,
        sym=False if args.asym else None,
        layer_config=layer_config,
        iters=args.iters,
        lr=args.lr,
        minmax_lr=args.minmax_lr,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        dataset=args.dataset,
        device_map=args.device_map,
        seed=args.seed,
        disable_opt_rtn=args.disable_opt_rtn,
        low_gpu_mem_usage=args.low_gpu_mem_usage,
        enable_torch_compile=args.enable_torch_compile,
        ignore_layers=args.ignore_layers,
        quant_lm_head=args.quant_lm_head,
        gradient_accumulate_steps=args.gradient_accumulate_steps,
        dynamic_max_gap=args.dynamic_max_gap,
        enable_adam=args.enable_adam,
        amp=not args.disable_amp,
        init_range=args.init_range,
        enable_minmax_tuning=not args.disable_minmax_tuning,
        enable_quanted_input=not args.disable_quanted_input,
        not_use_best_mse=args.not_use_best_mse,
        enable_deterministic_algorithms=args.enable_deterministic_algorithms,
        disable_model_free=args.disable_model_free,
    )
    fp_ppl = None
    if eval_text is not None:
        if ar.tokenizer is None:
            raise AutoRoundError("--eval_ppl needs the model's tokenizer, and none was found with the model")
        fp_ppl = text_perplexity(ar.model, ar.tokenizer, eval_text, args.eval_seqlen, args.eval_windows)
        print(f"float perplexity: {fp_ppl:.4f}", flush=True)
    start = time.time()
    _, folders = ar.quantize_and_save(args.output_dir, format=args.format, resume=args.resume)
    print(f"quantized in {time.time() - start:.1f}s; saved: {', '.join(folders)}", flush=True)
    if eval_text is not None:
        import torch
        from transformers import AutoModelForCausalLM

        from pathlib import Path

        for folder in folders:
            gguf_files = sorted(Path(folder).glob("*.gguf"))
            gguf_kw = {"gguf_file": gguf_files[0].name} if gguf_files else {}
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf_kw)
            q_ppl = text_perplexity(loaded.eval(), ar.tokenizer, eval_text, args.eval_seqlen, args.eval_windows)
            print(f"quantized perplexity ({folder}): {q_ppl:.4f}  (float {fp_ppl:.4f}, x{q_ppl / fp_ppl:.3f})")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "auto-round", recipe: str = "default") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["list"]:
            if len(argv) != 2:
                raise AutoRoundError(f"usage: {prog} list format|scheme")
            print(_list(argv[1]))
            return 0
        if argv[:1] == ["quantize"]:
            argv = argv[1:]
        args = build_parser(prog, recipe).parse_args(argv)
        return run(args)
    except (AutoRoundError, NotImplementedError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command with --resume to continue from the last finished block",
              file=sys.stderr)
        return 130


def main_best() -> int:
    return main(prog="auto-round-best", recipe="best")


def main_light() -> int:
    return main(prog="auto-round-light", recipe="light")


if __name__ == "__main__":
    sys.exit(main())
