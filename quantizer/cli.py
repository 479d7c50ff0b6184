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
from .options import (
    CalibrationOptions, PlanOptions, RuntimeOptions, TuningOptions, add_cli_arguments, cli_values, json_fields,
)

# recipe -> option defaults: default and best are the reference tool's published recipes; light (the fastest)
# differs inside: the reference's light is 50 iterations at lr 5e-3 from each group's min/max, ours starts every
# layer's min/max tuning from the importance-weighted searched range and takes 12 iterations at lr 2e-2 (about
# the same reach, lr x iters / 2); docs/benchmarks.md, "Accuracy per minute". An explicit --iters, --lr or
# --init_range still means what it says.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"iters": 200, "nsamples": 128, "lr": None},
    "best": {"iters": 1000, "nsamples": 512, "lr": None},
    "light": {"iters": 12, "nsamples": 128, "lr": 2e-2, "init_range": "search"},
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
    p.set_defaults(recipe=recipe)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", "--model_name", "--model_name_or_path", dest="model",
                   help="local model folder, Hugging Face hub id, or .gguf file")
    g.add_argument("--output_dir", default="./tmp_autoround", help="where the checkpoint goes (default %(default)s)")
    g.add_argument("--format", "--formats", dest="format", default=None,
                   help="export format(s), comma-separated (default auto_round, or the format a scheme it cannot "
                        "hold is named after: GGUF:Q4_K_M -> gguf:q4_k_m); see 'list format'")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted SignRound run from its last finished block (same command and "
                        "settings; the result equals an uninterrupted run)")
    # every option of quantizer/options.py, with the recipe's defaults
    add_cli_arguments(p, PlanOptions, "scheme", r)
    add_cli_arguments(p, TuningOptions, "algorithm", r)
    add_cli_arguments(p, CalibrationOptions, "calibration data", r)
    add_cli_arguments(p, RuntimeOptions, "runtime", r)
    g = p.add_argument_group("transforms")
    g.add_argument("--rotation_type", default=None, choices=["hadamard", "random_hadamard"],
                   help="rotate each quantized layer's input by a block Hadamard matrix (rotation_config)")
    g.add_argument("--rotation_block_size", type=int, default=None,
                   help="Hadamard rotation block size (default 32; must divide every rotated layer's input features)")
    g.add_argument("--rotation_seed", type=int, default=None, help="seed of random_hadamard's signs (default 0)")
    g.add_argument("--rotation_backend", default=None, choices=["auto", "transform", "inplace"],
                   help="auto / transform: each quantized layer's input rotated online (default); inplace: the "
                        "residual stream rotated and folded into the weights (QuaRot)")
    g.add_argument("--allow_online_rotation", default=None, action=argparse.BooleanOptionalAction,
                   help="with --rotation_backend inplace: also rotate down_proj's input online (default, as the "
                        "reference; only the fake format holds it); --no-allow_online_rotation folds only")
    g = p.add_argument_group("AutoScheme (mixed bits under an average-bits budget; replaces --scheme)")
    g.add_argument("--avg_bits", "--target_bits", dest="avg_bits", type=float, default=None,
                   help="average bits per weight to reach at most, e.g. 3.0 (scales and zero points counted)")
    g.add_argument("--options", default=None,
                   help="comma-separated schemes to choose from per layer, e.g. 'W2A16G64,W4A16,W8A16' (BF16 = float)")
    g.add_argument("--ignore_scale_zp_bits", action="store_true",
                   help="count only the weight bits against --avg_bits")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_ppl", default=None, metavar="FILE",
                   help="print perplexity of the float model and of the saved checkpoint on this UTF-8 text "
                        "file ('wikipedia' = gensim's Wikipedia test articles)")
    g.add_argument("--eval_seqlen", type=int, default=512, help="perplexity window length (default %(default)s)")
    g.add_argument("--eval_windows", type=int, default=40, help="number of windows (default %(default)s)")
    g = p.add_argument_group("lm-eval (evaluate with lm-eval's tasks)")
    g.add_argument("--eval", action="store_true",
                   help="evaluate --model itself (a float model or a quantized checkpoint) instead of quantizing it")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks; without --eval the checkpoint this run writes last is "
                        "evaluated; default with --eval: the reference's list online, ar_gensim_wikipedia_ppl,"
                        "ar_gensim_news_lastword offline (local tasks built from gensim's test data)")
    g.add_argument("--eval_bs", type=int, default=1, help="lm-eval batch size (default %(default)s)")
    g.add_argument("--limit", type=float, default=None,
                   help="documents per task: a count, or a fraction below 1 (default: all)")
    g.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    g.add_argument("--eval_task_by_task", action="store_true",
                   help="run one task at a time: a failing task is reported and the others still run")
    g.add_argument("--eval_backend", default="hf", choices=("hf", "vllm"),
                   help="hf: transformers (this project's loader); vllm: lm-eval's vLLM model (default %(default)s)")
    g.add_argument("--vllm_args", default="", help="extra vLLM engine arguments for --eval_backend vllm, 'k=v,k2=v2'")
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


def parse_mapping(option: str, text: str) -> dict[str, Any]:
    """A mapping given on the command line: JSON, the reference guide's unquoted spelling
    (``{k_proj:{bits:8},v_proj:{bits:8}}``), or the path of a JSON file holding either."""
    from pathlib import Path

    path = Path(text).expanduser()
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = _Loose(text).document()
        except ValueError as exc:
            raise AutoRoundError(
                f"{option} is neither JSON nor the unquoted form {{name:{{bits:8}}}} ({exc}); e.g. "
                f"{option} '{{\"mlp.down_proj\": {{\"bits\": 8}}}}' or {option} '{{k_proj:{{bits:8}}}}' or a .json file"
            ) from None
    if not isinstance(value, dict):
        raise AutoRoundError(f"{option} must be a mapping of layer name -> settings, got {type(value).__name__}")
    return value


class _Loose:
    """``{key:value,...}`` with bare or quoted keys and values; bare values become numbers, booleans or None where
    they read as such, strings otherwise (``GGUF:Q6_K`` stays a string: a value runs to the next , } or ])."""

    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def document(self) -> Any:
        value = self.value()
        self.space()
        if self.i != len(self.text):
            raise ValueError(f"unexpected {self.text[self.i:self.i + 10]!r} at character {self.i}")
        return value

    def space(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.space()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at character {self.i}")
        self.i += 1

    def value(self) -> Any:
        char = self.peek()
        if char == "{":
            return self.mapping()
        if char == "[":
            return self.sequence()
        return self.scalar(",}]")

    def items(self, open_: str, close: str, item) -> list[Any]:
        """``item()`` for each comma-separated entry between ``open_`` and ``close`` (a trailing comma is fine)."""
        self.expect(open_)
        out = []
        while self.peek() != close:
            out.append(item())
            if self.peek() == ",":
                self.i += 1
            elif self.peek() != close:
                raise ValueError(f"expected ',' or {close!r} at character {self.i}")
        self.i += 1
        return out

    def pair(self) -> tuple[str, Any]:
        key = self.scalar(":", key=True)
        self.expect(":")
        return str(key), self.value()

    def mapping(self) -> dict[str, Any]:
        return dict(self.items("{", "}", self.pair))

    def sequence(self) -> list[Any]:
        return self.items("[", "]", self.value)

    def scalar(self, stops: str, key: bool = False) -> Any:
        char = self.peek()
        if char in ("'", '"'):
            end = self.text.find(char, self.i + 1)
            if end < 0:
                raise ValueError(f"unclosed quote at character {self.i}")
            raw, self.i = self.text[self.i + 1 : end], end + 1
            return raw
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in stops + "{":
            self.i += 1
        raw = self.text[start : self.i].strip()
        if not raw:
            raise ValueError(f"missing {'name' if key else 'value'} at character {start}")
        if key:
            return raw
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("null", "none"):
            return None
        for kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                pass
        return raw


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


def _lm_eval_options(args: argparse.Namespace):
    """The lm-eval settings, checked (task names included) before any quantization; None without --eval/--tasks."""
    given = [f"--{n}" for n in ("eval_task_by_task",) if getattr(args, n)]
    given += [f"--{n}" for n, d in (("limit", None), ("num_fewshot", None), ("eval_bs", 1), ("eval_backend", "hf"),
                                    ("vllm_args", "")) if getattr(args, n) != d]
    if not args.eval and args.tasks is None:
        if given:
            raise AutoRoundError(f"{', '.join(given)} apply to lm-eval evaluation: add --tasks (or --eval)")
        return None
    from . import lmeval

    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise AutoRoundError(f"--limit {limit} is neither a whole count nor a fraction below 1")
        limit = int(limit)
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    options = lmeval.LmEvalOptions(tasks=tasks, batch_size=args.eval_bs, limit=limit, num_fewshot=args.num_fewshot,
                                   task_by_task=args.eval_task_by_task, backend=args.eval_backend,
                                   vllm_args=args.vllm_args)
    if args.eval:
        lmeval.check_tasks(options.tasks or lmeval.default_tasks(), lmeval.task_manager())
    else:  # the checkpoint is evaluated after quantization: what would fail then fails now
        lmeval.check_ready(options, lmeval.task_manager())
    return options


def _eval_only(model: str, options, output_dir: str) -> int:
    """``--eval``: lm-eval on the model given, loaded through transformers (our loader for quantized checkpoints)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from . import lmeval
    from .pipeline import load_checkpoint

    if options.backend == "vllm":
        if not Path(model).is_dir():
            raise AutoRoundError("--eval_backend vllm evaluates a local checkpoint folder: pass --model FOLDER")
        record = lmeval.run(None, None, options, output_dir, folder=model, label=model)
    else:
        from ..api import AutoRound

        if Path(model).expanduser().is_dir():  # a float model or any checkpoint this project loads
            folder = str(Path(model).expanduser())
            loaded, tok = load_checkpoint(folder), AutoTokenizer.from_pretrained(folder)
        else:  # a hub id or a .gguf file: loaded as quantization would load it
            ar = AutoRound(model)
            loaded, tok = ar.model, ar.tokenizer
            if tok is None:
                raise AutoRoundError(f"no tokenizer found with {model}: lm-eval needs one")
        record = lmeval.run(loaded, tok, options, output_dir, label=model)
    return 1 if record["failed"] else 0


def run(args: argparse.Namespace) -> int:
    from ..api import AutoRound

    model = args.model or args.model_pos
    if not model:
        raise AutoRoundError("no model given: pass --model FOLDER (or a hub id or .gguf file)")
    lm_eval_options = _lm_eval_options(args)
    if args.eval:
        if args.eval_ppl:
            raise AutoRoundError("--eval evaluates with lm-eval tasks; for perplexity on a text file quantize with "
                                 "--eval_ppl, or use --tasks ar_gensim_wikipedia_ppl")
        return _eval_only(model, lm_eval_options, args.output_dir)
    values = cli_values(args)
    for name in json_fields():
        if values.get(name):
            values[name] = parse_mapping(f"--{name}", values[name])
    if values.get("model_free"):  # plain RTN: the recipe's iters give way, values the user typed are checked
        parser = build_parser(recipe=args.recipe)
        for name in ("iters", "disable_opt_rtn"):
            if values[name] == parser.get_default(name):
                del values[name]
    rotation = (("hadamard_type", args.rotation_type), ("block_size", args.rotation_block_size),
                ("seed", args.rotation_seed), ("backend", args.rotation_backend),
                ("allow_online_rotation", args.allow_online_rotation))
    if any(v is not None for _, v in rotation[:-1]):
        values["rotation_config"] = {k: v for k, v in rotation if v is not None}
    elif args.allow_online_rotation is not None:
        raise AutoRoundError("--allow_online_rotation / --no-allow_online_rotation go with a rotation: add "
                             "--rotation_backend inplace (or --rotation_type)")
    if (args.avg_bits is None) != (args.options is None):
        raise AutoRoundError("AutoScheme needs both --avg_bits (or --target_bits) and --options")
    if args.avg_bits is not None:
        from .autoscheme import AutoScheme

        if values.get("scheme") not in (None, PlanOptions.scheme):
            raise AutoRoundError("--scheme and --avg_bits/--options exclude each other: AutoScheme picks the schemes")

        values["scheme"] = AutoScheme(avg_bits=args.avg_bits, options=args.options,
                                      ignore_scale_zp_bits=args.ignore_scale_zp_bits)
    elif args.ignore_scale_zp_bits:
        raise AutoRoundError("--ignore_scale_zp_bits is an AutoScheme option: pass --avg_bits and --options too")
    eval_text = _eval_text(args.eval_ppl) if args.eval_ppl else None
    ar = AutoRound(model, **values)
    fp_ppl = None
    if eval_text is not None:
        if ar.tokenizer is None:
            raise AutoRoundError("--eval_ppl needs the model's tokenizer, and none was found with the model")
        fp_ppl = ar.pipeline.evaluate(eval_text, args.eval_seqlen, args.eval_windows)
        print(f"float perplexity: {fp_ppl:.4f}", flush=True)
    start = time.time()
    _, folders = ar.quantize_and_save(args.output_dir, format=args.format, resume=args.resume)
    print(f"quantized in {time.time() - start:.1f}s; saved: {', '.join(folders)}", flush=True)
    if eval_text is not None:
        for folder in folders:
            q_ppl = ar.pipeline.evaluate(eval_text, args.eval_seqlen, args.eval_windows, folder=folder)
            print(f"quantized perplexity ({folder}): {q_ppl:.4f}  (float {fp_ppl:.4f}, x{q_ppl / fp_ppl:.3f})")
    if lm_eval_options is not None:  # the reference evaluates the last format written
        record = ar.pipeline.evaluate_tasks(lm_eval_options, folder=folders[-1], output_dir=folders[-1])
        return 1 if record["failed"] else 0
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
