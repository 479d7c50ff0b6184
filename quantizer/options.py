"""The options of a quantization run as typed groups: the one source of names, defaults, validation and help.

``AutoRound(**kw)`` keeps the reference tool's flat keyword signature and routes each keyword to the group
that owns the field (``split_options``); the CLI is generated from the same fields (``add_cli_arguments``);
the tuner, the planner and the calibration stage read the groups they need.  Four groups:

- ``PlanOptions``: which scheme each layer gets (stage "plan").
- ``CalibrationOptions``: the calibration data (stage "calibrate").
- ``TuningOptions``: round-to-nearest vs SignRound and SignRound's settings (stage "quantize").
- ``RuntimeOptions``: placement, compilation, determinism and the model-free route.

A field's ``metadata`` holds its help text and how the CLI spells it: ``flag`` (default ``--<name>``),
``aliases``, ``negate`` (a ``--disable_x``-style switch that stores False into a field whose default is True),
``cli_help`` where the flag's help differs from the field's, ``cli=False`` for fields the CLI does not take.

Options the reference accepts whose feature does not exist here are accepted only at the value that means
"as usual", and refused otherwise with a message that says so (``check_unsupported``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

INIT_RANGES = ("minmax", "search", "auto")
DEFAULT_DATASET = "NeelNanda/pile-10k"


def _opt(default: Any, help: str, **cli: Any) -> Any:
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **cli}, **kw)


def check_init_range(value: Any) -> None:
    if value not in INIT_RANGES:
        raise ValueError(f"init_range must be one of {', '.join(INIT_RANGES)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PlanOptions:
    """Which scheme each layer gets."""

    scheme: Any = _opt("W4A16", "preset scheme (see 'list scheme'), a dict, a QuantScheme, or an "
                       "AutoScheme (mixed bits; on the command line --avg_bits and --options)")
    bits: int | None = _opt(None, "override the scheme's weight bits", type=int)
    group_size: int | None = _opt(
        None, "override the group size: -1 per output channel, 0 per tensor, N > 0 input channels per group", type=int
    )
    sym: bool | None = _opt(None, "symmetric (True) or asymmetric (False) weights (default: the scheme's)",
                            flag="--asym", store=False, cli_help="asymmetric weights (default: the scheme's)")
    data_type: str | None = _opt(None, "override the weights' data type: int, mx_fp, mx_int, nv_fp, fp (FP8)")
    act_bits: int | None = _opt(None, "override the activation bits: 4, 8 or 16 (weight-only)", type=int)
    act_group_size: int | None = _opt(
        None, "override the activation group size: -1 per token, 0 per tensor, N features per group", type=int
    )
    act_sym: bool | None = _opt(None, "symmetric activations (default: the scheme's)", flag="--act_asym",
                                store=False, cli_help="asymmetric activations (default: the scheme's)")
    act_data_type: str | None = _opt(None, "override the activations' data type: int, fp, mx_fp, mx_fp_rceil, "
                                     "mx_int, nv_fp4_with_static_gs")
    act_dynamic: bool | None = _opt(None, "dynamic (per call) activation scales (default: the scheme's)",
                                    flag="--disable_act_dynamic", store=False,
                                    cli_help="static activation scales measured on the calibration data")
    layer_config: Mapping[str, Any] | None = _opt(
        None, "per-layer overrides as a JSON object, e.g. '{\"mlp.down_proj\": {\"bits\": 8}}' (exact, regex or "
        "substring names; bits 16 keeps a layer in float)", json=True,
    )
    ignore_layers: Any = _opt("", "comma-separated layer names or patterns to keep in float", aliases=["--fp_layers"])
    to_quant_block_names: Any = _opt(None, "comma-separated names of the block lists to quantize (default: found)")
    quant_lm_head: bool = _opt(False, "also quantize lm_head")
    super_bits: int | None = _opt(None, "GGUF k-quant super-block scale bits: fixed by the GGUF type", cli=False)
    super_group_size: int | None = _opt(None, "GGUF k-quant super-block size: fixed by the GGUF type", cli=False)
    scale_dtype: Any = _opt("fp16", "dtype of the stored scales: every format here stores float16", cli=False)
    rotation_config: Any = _opt(
        None, "Hadamard rotation of each quantized layer's input: 'default' (block-32 Hadamard), 'random_hadamard', "
        "or {'hadamard_type': ..., 'block_size': N, 'seed': S}", cli=False,
    )
    quant_nontext_module: bool = _opt(
        False, "also quantize the vision/audio towers of multimodal models (plain RTN: calibration is text-only)"
    )


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration data of optimized RTN and SignRound."""

    dataset: Any = _opt(
        DEFAULT_DATASET, "name[:split=..][:num=N][:concat=True], comma-separated; a hub id or a local "
        ".txt/.json/.jsonl/.parquet file (offline, the default falls back to a packaged corpus)",
    )
    nsamples: int = _opt(128, "calibration samples", type=int)
    seqlen: int = _opt(2048, "tokens per calibration sample", type=int)

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen"):
            _positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class TuningOptions:
    """Round-to-nearest (iters 0) or SignRound (iters > 0), and SignRound's settings.

    SignRound learns per-weight rounding offsets and, with min/max tuning, per-group factors on the min and
    max; the learning rate decays linearly to 0 and each block keeps its best iteration."""

    iters: int = _opt(200, "SignRound iterations per block; 0 = round-to-nearest", type=int)
    lr: float | None = _opt(None, "SignRound learning rate (default 1/iters)", type=float)
    minmax_lr: float | None = _opt(None, "learning rate of the min/max factors (default lr)", type=float)
    batch_size: int = _opt(8, "calibration batch size", type=int, aliases=["--bs"])
    gradient_accumulate_steps: int = _opt(1, "batches whose gradients make one step", type=int)
    enable_minmax_tuning: bool = _opt(True, "tune the per-group min/max", flag="--disable_minmax_tuning", negate=True,
                                      cli_help="do not tune the per-group min/max")
    enable_quanted_input: bool = _opt(
        True, "tune each block on the quantized model's inputs (off: on the float model's)",
        flag="--disable_quanted_input", negate=True,
        cli_help="tune each block on the float model's inputs instead of the quantized model's",
    )
    not_use_best_mse: bool = _opt(False, "keep the last iteration, not the best one")
    dynamic_max_gap: int = _opt(
        -1, "stop tuning a block after this many iterations without a better loss (<= 0: never)", type=int
    )
    enable_adam: bool = _opt(False, "AdamW instead of signed gradient descent", aliases=["--adam"])
    amp: bool = _opt(
        True, "tuning steps under bf16 autocast, as the reference (refused with a warning where bf16 matmuls are "
        "slow); off: tune in the model's dtype", flag="--disable_amp", negate=True,
        cli_help="tune in the model's own dtype instead of under bf16 autocast (the default, as the reference)",
    )
    init_range: str = _opt(
        "auto", "where the min/max tuning starts: each group's min/max (the reference), optimized RTN's searched "
        "range, or auto = searched for 2- and 3-bit layers", choices=INIT_RANGES,
    )
    enable_alg_ext: bool = _opt(
        False, "SignRoundV2 (the reference's algorithm extension): every integer layer's min/max tuning starts from "
        "the importance-weighted searched range and its factors may move in [0, 2] instead of [0, 1]; blocks with "
        "layers below 4 bits are tuned on a loss without the largest 0.1 percent of elementwise errors",
    )
    disable_opt_rtn: bool = _opt(
        False, "with iters 0: plain RTN, no activation-weighted scale search and no calibration data"
    )
    nblocks: int = _opt(1, "blocks tuned together: only 1 exists so far", type=int, cli=False)
    seed: int = _opt(42, "random seed", type=int)

    def __post_init__(self) -> None:
        check_init_range(self.init_range)
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        for name in ("batch_size", "gradient_accumulate_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("lr", "minmax_lr"):
            val = getattr(self, name)
            if val is not None and not val > 0:
                raise ValueError(f"{name} must be positive, got {val!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


@dataclass(frozen=True)
class SignRoundOptions(TuningOptions):
    """``TuningOptions`` of a SignRound run: iters must be positive."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters <= 0:
            raise ValueError(f"iters must be a positive integer for SignRound, got {self.iters!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the work runs."""

    device_map: Any = _opt(None, "device for the model, e.g. cpu, cuda:0, auto (default: cpu)", aliases=["--device"])
    low_gpu_mem_usage: bool = _opt(False, "keep cached activations off the accelerator")
    low_cpu_mem_usage: bool = _opt(
        True, "streamed tuning: a local model folder's blocks are read when they are tuned and packed at once, so "
        "memory holds one block, not the model (same checkpoint); off: load the whole model",
        flag="--disable_low_cpu_mem_usage", negate=True,
    )
    enable_torch_compile: bool = _opt(False, "torch.compile the tuned block's forward")
    enable_deterministic_algorithms: bool = _opt(
        False, "torch.use_deterministic_algorithms(True) (slower on some accelerators)"
    )
    disable_model_free: bool = _opt(
        False, "with iters 0 and disable_opt_rtn: load the model and quantize it in memory instead of streaming "
        "the folder's weights tensor by tensor (same checkpoint, more memory)",
    )
    model_free: bool = _opt(
        False, "plain RTN streamed from a local model folder's files without loading the model (sets iters 0 and "
        "disable_opt_rtn); refused when the run cannot take that route",
    )

    def __post_init__(self) -> None:
        if self.model_free and self.disable_model_free:
            raise ValueError("model_free=True and disable_model_free=True exclude each other: choose one")


GROUPS = (PlanOptions, CalibrationOptions, TuningOptions, RuntimeOptions)


def fields_of(group: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(group))


def option_names() -> list[str]:
    return [f.name for g in GROUPS for f in fields_of(g)]


def defaults() -> dict[str, Any]:
    """Every option's default, by name."""
    out = {}
    for g in GROUPS:
        for f in fields_of(g):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def split_options(values: Mapping[str, Any]) -> dict[type, dict[str, Any]]:
    """Route flat keywords to their groups; an unknown keyword is a ``TypeError`` listing the valid ones."""
    owner = {f.name: g for g in GROUPS for f in fields_of(g)}
    unknown = sorted(set(values) - set(owner))
    if unknown:
        raise TypeError(
            f"AutoRound got unknown argument(s) {unknown}; valid arguments: "
            f"{', '.join(sorted(['model', 'tokenizer', *owner]))}"
        )
    out: dict[type, dict[str, Any]] = {g: {} for g in GROUPS}
    for name, value in values.items():
        out[owner[name]][name] = value
    return out


def build_options(values: Mapping[str, Any]) -> tuple[PlanOptions, CalibrationOptions, TuningOptions, RuntimeOptions]:
    """The four groups from flat keywords (defaults for the rest); a bad value raises ``ValueError``."""
    split = split_options(values)
    return tuple(g(**split[g]) for g in GROUPS)  # type: ignore[return-value]


def apply_model_free(values: Mapping[str, Any]) -> dict[str, Any]:
    """``model_free=True`` means plain RTN (the reference's model-free mode ignores tuning): it sets ``iters=0`` and
    ``disable_opt_rtn=True``, and refuses values given for those that ask for something else."""
    out = dict(values)
    if not out.get("model_free"):
        return out
    conflicts = []
    if out.get("iters", 0) != 0:
        conflicts.append(f"iters={out['iters']!r}")
    if out.get("disable_opt_rtn", True) is not True:
        conflicts.append("disable_opt_rtn=False")
    if conflicts:
        raise ValueError(
            f"model_free=True quantizes with plain RTN (iters=0, disable_opt_rtn=True) and cannot honour "
            f"{', '.join(conflicts)}: drop model_free for tuned or optimized RTN runs"
        )
    out.update(iters=0, disable_opt_rtn=True)
    return out


# -- options accepted for compatibility, refused unless they ask for what happens anyway -------------------------

_FP16_NAMES = ("fp16", "float16", "torch.float16", "half")


def check_unsupported(plan: PlanOptions, tuning: TuningOptions) -> None:
    """Refuse reference options whose feature does not exist here, unless their value is the usual one."""
    import torch

    if plan.super_bits is not None or plan.super_group_size is not None:
        raise ValueError(
            "super_bits / super_group_size are fixed by the GGUF type here (q2_k..q6_k super-blocks follow "
            "llama.cpp's layout); choose a GGUF scheme such as scheme='GGUF:Q4_K_M' and leave them unset"
        )
    sd = plan.scale_dtype
    if not (sd is torch.float16 or (isinstance(sd, str) and sd.strip().lower() in _FP16_NAMES)):
        raise ValueError(
            f"scale_dtype={sd!r} is not supported: every format here stores float16 scales; leave it at 'fp16'"
        )
    from .transforms.rotation import RotationSpec

    RotationSpec.parse(plan.rotation_config)  # one clear error for a bad rotation_config
    if isinstance(tuning.nblocks, bool) or tuning.nblocks != 1:
        raise ValueError(
            f"nblocks={tuning.nblocks!r} is not supported yet: SignRound tunes one decoder block at a time; "
            "leave nblocks at 1"
        )


# -- the CLI, generated from the fields --------------------------------------------------------------------------

def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f"--{f.name}")


def add_cli_arguments(parser: argparse.ArgumentParser, group: type, title: str,
                      overrides: Mapping[str, Any] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One argparse group with an argument per CLI-visible field of ``group``; ``overrides`` change defaults
    (a recipe's iters, say)."""
    g = parser.add_argument_group(title)
    base = defaults()
    for f in fields_of(group):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        default = (overrides or {}).get(f.name, base[f.name])
        names = [_flag(f), *meta.get("aliases", [])]
        help_text = meta.get("cli_help", meta["help"])
        if meta.get("negate"):
            g.add_argument(*names, dest=f.name, action="store_false", default=default, help=help_text)
        elif "store" in meta:
            g.add_argument(*names, dest=f.name, action="store_const", const=meta["store"], default=None,
                           help=help_text)
        elif isinstance(base[f.name], bool):
            g.add_argument(*names, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            kw: dict[str, Any] = {"type": meta["type"]} if "type" in meta else {}
            if "choices" in meta:
                kw["choices"] = list(meta["choices"])
            shown = "" if default in (None, "") else " (default %(default)s)"
            g.add_argument(*names, dest=f.name, default=default, help=help_text + shown, **kw)


def json_fields() -> list[str]:
    """Options the CLI takes as a JSON string."""
    return [f.name for g in GROUPS for f in fields_of(g) if f.metadata.get("json")]


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The option values an argparse namespace holds (every CLI-visible field)."""
    return {name: getattr(args, name) for name in option_names() if hasattr(args, name)}
