"""What the vLLM and SGLang adapters share, in plain Python: no engine is imported here.

Both engines hand a quantization method a layer *prefix* (``model.layers.0.self_attn.qkv_proj``) that can
name a fused layer made of several checkpoint layers (``q_proj``, ``k_proj``, ``v_proj``).  This module
turns a checkpoint's ``quantization_config`` into one plan per engine layer with the same rules the
transformers loader uses (``CheckpointQuantConfig``: scheme, ``extra_config``, ``block_name_to_quantize``),
checks that the parts of a fused layer agree, and decides which kernel family runs it:

- ``ROUTE_OURS``: this project's kernels from ``autoround.backends`` (CPU, and any layer the engine's own
  kernels cannot run);
- ``ROUTE_ENGINE``: on CUDA, the engine's own GPTQ kernels (Marlin/Machete/ExLlama; symmetric 4/8-bit).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from autoround.backends import KernelInfo, LayerSpec, select_kernel
from autoround.quantizer.dtypes import family_of
from autoround.quantizer.errors import ModelLoadError, SchemeError
from autoround.quantizer.formats.auto_round import (
    FLOAT_PACKINGS, PACKING_ALIASES, PACKING_AWQ, PACKING_GPTQ, PACKING_MLX,
)
from autoround.quantizer.formats.packing import PACK_BITS
from autoround.quantizer.schemes import FLOAT, QuantScheme

from .checkpoint_config import CheckpointQuantConfig

QUANT_METHOD = "auto-round"  # the name both engines know this method by
CLAIMED_METHODS = ("auto-round", "auto_round")  # quant_method values claimed without being asked
ASKABLE_METHODS = ("gptq",)  # quant_method values claimed when the user asks for quantization="auto-round"

ROUTE_OURS = "autoround"
ROUTE_ENGINE = "engine_gptq"

# fused engine layers and the checkpoint layers they are made of, for models whose class does not say
DEFAULT_PACKED_MODULES: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
# names of the projections inside one MoE expert, by model family
EXPERT_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# what the engines' GPTQ kernels (Marlin and friends) take
_ENGINE_GROUPS = (-1, 32, 64, 128)
_ENGINE_BITS = (4, 8)


def normalize_quant_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``quantization_config`` checked and converted for ``CheckpointQuantConfig``."""
    cfg = dict(cfg)
    method = str(cfg.get("quant_method", QUANT_METHOD)).lower()
    if method == "gptq":
        if cfg.get("desc_act"):
            raise SchemeError(
                "GPTQ checkpoints with desc_act=True (act-order) cannot be served by the AutoRound method; "
                "serve them with the engine's own 'gptq' method"
            )
        cfg["packing_format"] = cfg.get("packing_format") or PACKING_GPTQ
    elif method not in CLAIMED_METHODS:
        raise SchemeError(
            f"quant_method {method!r} cannot be served by the AutoRound method; supported: "
            f"{', '.join(CLAIMED_METHODS + ASKABLE_METHODS)}"
        )
    data_type = cfg.get("data_type") or "int"
    if data_type != "int":
        raise SchemeError(
            f"data_type {data_type!r} is not supported by the AutoRound engine method; only integer weights "
            "(data_type 'int', schemes W2A16..W8A16). MXFP4/MXFP8/NVFP4/FP8 checkpoints are served by the engines' "
            "compressed-tensors method: export them with --format llm_compressor (or fp8 for FP8_BLOCK)"
        )
    act_bits = int(cfg.get("act_bits") or 16)
    if act_bits < 16:
        raise SchemeError(f"act_bits={act_bits}: only weight-only checkpoints (act_bits 16) can be served")
    return cfg


def parse_checkpoint_config(cfg: Mapping[str, Any]) -> CheckpointQuantConfig:
    """``CheckpointQuantConfig`` of a checkpoint as an engine sees it; unservable bits fail here."""
    ckpt = CheckpointQuantConfig.from_dict(normalize_quant_config(cfg))
    if ckpt.packing_format == PACKING_MLX:
        raise SchemeError(
            "this checkpoint uses MLX's packing (auto_round:mlx), which the AutoRound engine method does not "
            "serve; load it with mlx-lm or transformers, or export again with --format auto_round for serving"
        )
    if ckpt.packing_format in FLOAT_PACKINGS:
        raise SchemeError(
            f"packing_format {ckpt.packing_format!r} holds MX / NVFP4 / FP8 weights, which the AutoRound engine "
            "method does not serve; export them with --format llm_compressor (fp8 for FP8_BLOCK) for the engines' "
            "compressed-tensors kernels, or load this checkpoint with transformers"
        )
    if ckpt.rotation is not None:
        raise SchemeError(
            f"this checkpoint rotates each layer's input ({ckpt.rotation.hadamard_type}, block "
            f"{ckpt.rotation.block_size}: rotation_config), which the AutoRound engine method does not apply; load it "
            "with transformers, or quantize again without rotation_config for serving"
        )
    check_servable(ckpt.default, "the checkpoint's default scheme")
    return ckpt


def check_servable(scheme: QuantScheme, where: str) -> None:
    if scheme.is_float:
        return
    if scheme.bits not in PACK_BITS:
        raise SchemeError(
            f"{where} is {scheme.bits}-bit: the AutoRound engine method serves {', '.join(map(str, PACK_BITS))}-bit "
            "integer weights (or 16 = float); requantize with one of those"
        )


def resolve_backend(requested: str | None) -> str:
    """This project's kernel name (or ``auto``) for a checkpoint's or user's ``backend`` setting."""
    backend = str(requested or "auto")
    if backend.startswith(("auto_round", "gptq")):  # Intel's backend spellings: pick ours
        return "auto"
    if backend not in ("auto", "torch"):
        from autoround.backends import kernels

        valid = ("auto",) + tuple(k.name for k in kernels())
        if backend not in valid:
            raise SchemeError(f"backend={backend!r} is not known; valid backends: {', '.join(valid)}")
    return backend


def claims(hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None) -> bool:
    """Whether the AutoRound method takes a checkpoint (``override_quantization_method`` of both engines)."""
    if not hf_quant_cfg:
        return False
    method = str(hf_quant_cfg.get("quant_method", "")).lower()
    if user_quant in (QUANT_METHOD, "auto_round"):
        return method in CLAIMED_METHODS + ASKABLE_METHODS
    if user_quant not in (None, "", QUANT_METHOD):
        return False  # the user asked for another method
    return method in CLAIMED_METHODS


def checkpoint_tensor_names(folder: str | os.PathLike | None) -> set[str] | None:
    """Names of the tensors in a local safetensors checkpoint folder; None when it cannot be read."""
    if not folder or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def shard_layer_names(prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Checkpoint layer names that make up the engine layer ``prefix`` (itself when it is not fused)."""
    mapping = dict(DEFAULT_PACKED_MODULES)
    mapping.update(packed_modules_mapping or {})
    parent, _, leaf = prefix.rpartition(".")
    if leaf in mapping:
        return [f"{parent}.{part}" if parent else part for part in mapping[leaf]]
    return [prefix]


def _strip_language_model(name: str) -> list[str]:
    """Spellings of one layer name that a checkpoint may use (engines add or drop wrapper prefixes)."""
    out = [name]
    for wrapper in ("language_model.", "model.language_model."):
        if name.startswith(wrapper):
            out.append("model." + name[len(wrapper):] if wrapper == "language_model." else name[len("model."):])
    return out


@dataclass(frozen=True)
class LayerPlan:
    """How one engine layer is served: its scheme (``FLOAT`` = unquantized) and the checkpoint layers in it."""

    prefix: str
    scheme: QuantScheme
    parts: tuple[str, ...]

    @property
    def quantized(self) -> bool:
        return not self.scheme.is_float


class EnginePlanner:
    """Per-layer plans for one checkpoint: shared by the vLLM and SGLang configs."""

    def __init__(self, ckpt: CheckpointQuantConfig, tensor_names: set[str] | None = None) -> None:
        self.ckpt = ckpt
        self.tensor_names = tensor_names

    def set_tensor_names(self, names: set[str] | None) -> None:
        self.tensor_names = names

    def part_scheme(self, name: str) -> QuantScheme:
        """Scheme of one checkpoint layer; a layer the checkpoint stores as a float weight is ``FLOAT``."""
        scheme = FLOAT
        for spelling in _strip_language_model(name):
            scheme = self.ckpt.scheme_for(spelling)
            if not scheme.is_float:
                break
        if scheme.is_float or self.tensor_names is None:
            return scheme
        spellings = _strip_language_model(name)
        if any(f"{s}.qweight" in self.tensor_names for s in spellings):
            return scheme
        if any(f"{s}.weight" in self.tensor_names for s in spellings):
            return FLOAT  # the writer kept it in float (e.g. a shape that cannot be packed)
        return scheme  # neither: the loader reports the missing tensors

    def plan(self, prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]] | None = None) -> LayerPlan:
        parts = shard_layer_names(prefix, packed_modules_mapping)
        schemes = {p: self.part_scheme(p) for p in parts}
        _require_same(prefix, schemes, "fused layer")
        scheme = next(iter(schemes.values()))
        check_servable(scheme, f"layer {prefix}")
        return LayerPlan(prefix, scheme, tuple(parts))

    def expert_parts(self, prefix: str, num_experts: int) -> list[str]:
        """Checkpoint names of every projection of every expert under ``prefix`` (``...mlp.experts``)."""
        projections = EXPERT_PROJECTIONS[0]
        if self.tensor_names is not None:
            for cand in EXPERT_PROJECTIONS:
                if any(n.startswith(f"{prefix}.0.{cand[0]}.") for n in self.tensor_names):
                    projections = cand
                    break
        return [f"{prefix}.{e}.{p}" for e in range(num_experts) for p in projections]

    def plan_experts(self, prefix: str, num_experts: int) -> LayerPlan:
        """One plan for a fused MoE layer: every expert projection must share one scheme."""
        parts = self.expert_parts(prefix, num_experts)
        schemes = {p: self.part_scheme(p) for p in parts}
        _require_same(prefix, schemes, "fused MoE layer")
        scheme = next(iter(schemes.values()))
        check_servable(scheme, f"MoE layer {prefix}")
        return LayerPlan(prefix, scheme, tuple(parts))

    def missing_tensors(self, plan: LayerPlan, has_bias: bool = False) -> list[str]:
        """Tensors a quantized plan needs that the checkpoint folder lacks (empty when unknown)."""
        if self.tensor_names is None or not plan.quantized:
            return []
        missing = []
        for part in plan.parts:
            spellings = _strip_language_model(part)
            for suffix in ("qweight", "qzeros", "scales"):
                if not any(f"{s}.{suffix}" in self.tensor_names for s in spellings):
                    missing.append(f"{part}.{suffix}")
        return missing

    def require_tensors(self, plan: LayerPlan, prefix: str, experts: bool = False) -> None:
        """Fail, naming them, when the checkpoint lacks tensors the plan of ``prefix`` needs."""
        missing = self.missing_tensors(plan)
        if not missing:
            return
        if experts:
            raise ModelLoadError(f"the checkpoint is missing quantized expert tensors of {prefix}: {_short(missing)}")
        raise ModelLoadError(
            f"the checkpoint is missing quantized tensors of {prefix}: {', '.join(missing)}; "
            "re-export it (its quantization_config says these layers are quantized)"
        )


def _require_same(prefix: str, schemes: Mapping[str, QuantScheme], what: str) -> None:
    distinct = set(schemes.values())
    if len(distinct) <= 1:
        return
    groups: dict[QuantScheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    detail = "; ".join(f"{_short(names)}: {scheme.describe()}" for scheme, names in groups.items())
    raise SchemeError(
        f"{what} {prefix} is made of checkpoint layers with different quantization settings ({detail}); "
        "the engine runs a fused layer with one setting, so quantize these layers alike "
        "(one layer_config entry for all of them) or serve the checkpoint with transformers"
    )


def _short(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def cuda_route(
    scheme: QuantScheme,
    packing_format: str,
    in_features: int,
    out_features: int,
    capability: int | None,
) -> tuple[str, str]:
    """Which kernel family runs a quantized layer on CUDA, and why (``(route, reason)``).

    ``capability`` is the GPU's compute capability as an int (80 = sm_80); ``in/out_features`` are the
    per-rank partition sizes.  The engine's GPTQ machinery (Marlin, Machete, ExLlama, chosen by the engine
    per GPU) takes symmetric 4/8-bit weights in the GPTQ layout with group -1/32/64/128 dividing the input
    features (it ignores the stored zero points, so either zero-point convention works); every other layer
    (2/3-bit, asymmetric, ragged or per-tensor groups) runs on this project's kernels.
    """
    reasons = []
    if not scheme.sym:
        reasons.append("asymmetric weights")
    if scheme.bits not in _ENGINE_BITS:
        reasons.append(f"{scheme.bits}-bit")
    if scheme.group_size not in _ENGINE_GROUPS:
        reasons.append(f"group_size {scheme.group_size}")
    elif scheme.group_size > 0 and in_features % scheme.group_size:
        reasons.append(f"group_size {scheme.group_size} leaves a ragged last group of {in_features} inputs")
    if capability is None or capability < 75:
        reasons.append(f"compute capability {capability} < 75")
    if out_features % 64 or in_features % 128:
        reasons.append(f"shape [{out_features} x {in_features}] does not fit the engine's tiles (64 x 128)")
    if not reasons:
        return ROUTE_ENGINE, "engine GPTQ kernels (Marlin/Machete/ExLlama) fit"
    return ROUTE_OURS, "autoround kernels (engine kernels rejected: " + "; ".join(reasons) + ")"


def layer_spec(
    scheme: QuantScheme, packing_format: str, in_features: int, out_features: int, device: str, dtype: torch.dtype
) -> LayerSpec:
    return LayerSpec(
        device=device,
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
        packing_format=packing_format,
        in_features=in_features,
        out_features=out_features,
        act_dtype=dtype,
        act_bits=scheme.act_bits,
        weight_family=family_of(scheme).name,
    )


def choose_kernel(
    scheme: QuantScheme,
    packing_format: str,
    in_features: int,
    out_features: int,
    device: str,
    dtype: torch.dtype,
    backend: str = "auto",
) -> KernelInfo:
    """This project's kernel for one (possibly fused) layer, through the backends' selector."""
    return select_kernel(layer_spec(scheme, packing_format, in_features, out_features, device, dtype), backend)


def build_kernel(
    info: KernelInfo,
    scheme: QuantScheme,
    zero_offset: int,
    tensors: Mapping[str, torch.Tensor],
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | str,
    name: str,
) -> torch.nn.Module:
    """A ready kernel module holding a layer's packed tensors (``qweight``, ``qzeros``, ``scales``)."""
    module = info.factory(
        in_features,
        out_features,
        scheme.bits,
        scheme.group_size,
        scheme.sym,
        bias is not None,
        zero_offset=zero_offset,
        device=device,
    )
    for key in ("qweight", "qzeros", "scales"):
        buf = getattr(module, key)
        src = tensors[key]
        if tuple(buf.shape) != tuple(src.shape):
            raise ModelLoadError(
                f"{name}.{key} has shape {tuple(src.shape)} but a {scheme.describe()} layer of "
                f"[{out_features} x {in_features}] needs {tuple(buf.shape)}: the checkpoint does not match its "
                "quantization_config"
            )
        buf.copy_(src.to(buf.dtype))
    if bias is not None:
        module.bias.data = bias.detach().to(device=device, dtype=dtype).clone()
    module.post_init()
    return module


def is_awq_layout(packing_format: str) -> bool:
    """Whether a packing stores ``qweight`` in the AWQ layout (``[in, out/8]``) rather than GPTQ's."""
    return PACKING_ALIASES.get(packing_format, packing_format) == PACKING_AWQ


def expected_shapes(
    scheme: QuantScheme, in_features: int, out_features: int, packing_format: str = PACKING_GPTQ
) -> dict[str, tuple[int, int]]:
    """Shapes of the packed tensors of one layer (GPTQ layout, or AWQ layout for the AWQ packing)."""
    from autoround.quantizer.qmath import group_layout

    _, n_groups = group_layout(in_features, scheme.group_size)
    if is_awq_layout(packing_format):
        return {
            "qweight": (in_features, out_features * scheme.bits // 32),
            "qzeros": (n_groups, out_features * scheme.bits // 32),
            "scales": (n_groups, out_features),
        }
    return {
        "qweight": (in_features * scheme.bits // 32, out_features),
        "qzeros": (n_groups, out_features * scheme.bits // 32),
        "scales": (n_groups, out_features),
    }


# --- loading packed tensors into an engine's (possibly fused) layer -----------------------------------
# Both engines create one parameter per packed tensor for a whole fused layer and load each checkpoint
# part into its slice through their weight loaders, with a shard id: "q"/"k"/"v" for QKV layers, 0, 1, ...
# for merged column layers, None for a plain layer.  These helpers name the checkpoint tensors behind a
# shard, check shapes before the engine copies (the engines' own asserts do not name the tensor, and
# SGLang's CPU path pads a short tensor silently) and list the tensors that never arrived.

PACKED_TENSORS = ("qweight", "qzeros", "scales")
QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def shard_index(shard_id: Any) -> int | None:
    """Position of a shard in a fused layer's output sizes (None for a plain layer or an unknown id)."""
    if shard_id is None:
        return None
    if isinstance(shard_id, str):
        return QKV_INDEX.get(shard_id)
    if isinstance(shard_id, int):
        return shard_id
    return None


def expected_shard_ids(num_outputs: int, qkv: bool) -> list:
    """The shard ids an engine loads a layer with ``num_outputs`` output sizes through."""
    if num_outputs == 1:
        return [None]
    if qkv:
        return ["q", "k", "v"][:num_outputs]
    return list(range(num_outputs))


def part_name(plan: LayerPlan, shard_id: Any) -> str:
    """The checkpoint layer behind one shard of an engine layer."""
    if shard_id is None:
        return plan.prefix if len(plan.parts) != 1 else plan.parts[0]
    idx = shard_index(shard_id)
    return plan.parts[idx] if idx is not None and idx < len(plan.parts) else f"{plan.prefix}[{shard_id}]"


def checkpoint_shape(
    key: str,
    scheme: QuantScheme,
    in_features: int,
    out_sizes: Sequence[int],
    shard_id: Any,
    packing_format: str = PACKING_GPTQ,
) -> tuple[int, ...] | None:
    """The shape one checkpoint tensor (``qweight``/``qzeros``/``scales``/``g_idx`` of one part) must have
    when the model runs on one rank; ``in_features`` and ``out_sizes`` are the full layer's sizes.  None
    when the shard id is not one the layer knows (the engine reports that)."""
    if shard_id is None:
        out = sum(out_sizes)
    else:
        idx = shard_index(shard_id)
        if idx is None or idx >= len(out_sizes):
            return None
        out = out_sizes[idx]
    if key == "g_idx":
        return (in_features,)
    shapes = expected_shapes(scheme, in_features, out, packing_format)
    return shapes.get(key)


def shape_error(name: str, got: Sequence[int], scheme: QuantScheme, want: Sequence[int]) -> ModelLoadError:
    return ModelLoadError(
        f"checkpoint tensor {name} has shape {tuple(got)} but its quantization_config "
        f"({scheme.describe()}) and the model's layer size need {tuple(want)}: the checkpoint does not "
        "match its config (re-export it)"
    )


def load_error(
    name: str, got: Sequence[int], key: str, param_shape: Sequence[int], scheme: QuantScheme, exc: Exception
) -> ModelLoadError:
    return ModelLoadError(
        f"checkpoint tensor {name} with shape {tuple(got)} does not fit the layer's {key} of shape "
        f"{tuple(param_shape)} ({scheme.describe()}): {exc}"
    )


def missing_after_load(
    plan: LayerPlan, shard_ids: Sequence[Any], loaded: set, keys: Sequence[str] = PACKED_TENSORS
) -> ModelLoadError | None:
    """The error for packed tensors that no weight loader call delivered (``loaded`` holds ``(key,
    shard_id)`` pairs; a ``(key, None)`` pair covers every shard: a checkpoint that stores the fused layer)."""
    missing = [
        f"{part_name(plan, shard)}.{key}" for key in keys for shard in shard_ids
        if (key, shard) not in loaded and (key, None) not in loaded
    ]
    if not missing:
        return None
    return ModelLoadError(
        f"the checkpoint is missing quantized tensors: {_short(missing)}; it does not match its "
        "quantization_config (re-export it)"
    )


def check_partition(plan: LayerPlan, in_partition: int, input_size: int, out_partition: int) -> None:
    """Checks that a layer's tensor-parallel shard can hold packed weights (before any weight is read)."""
    scheme = plan.scheme
    row_parallel = input_size != in_partition
    if row_parallel and scheme.group_size > 0 and in_partition % scheme.group_size:
        raise SchemeError(
            f"{plan.prefix}: group_size {scheme.group_size} does not divide this tensor-parallel "
            f"shard of {in_partition} input features; use a smaller tensor_parallel_size"
        )
    if row_parallel and scheme.group_size <= 0:
        raise SchemeError(f"{plan.prefix}: group_size {scheme.group_size} cannot be split across ranks")
    for what, n in (("input", in_partition), ("output", out_partition)):
        if (n * scheme.bits) % 32:
            raise SchemeError(
                f"{plan.prefix}: {n} {what} features at {scheme.bits}-bit do not fill whole int32 words"
            )


def plain_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The GPTQ ``g_idx`` of a layer without act-order: input channel ``i`` is in group ``i // group_size``."""
    return torch.arange(in_features, dtype=torch.int32) // (group_size if group_size > 0 else max(in_features, 1))


def check_g_idx(name: str, g_idx: torch.Tensor, group_size: int) -> None:
    """A GPTQ ``g_idx`` must be the plain ``i // group_size`` order: act-order checkpoints are refused."""
    expected = plain_g_idx(g_idx.numel(), group_size).to(torch.int64)
    if not torch.equal(g_idx.to(torch.int64).cpu(), expected):
        raise ModelLoadError(
            f"{name}.g_idx is not the plain group order i // {group_size} (an act-order / desc_act "
            "checkpoint): the AutoRound method cannot serve it; use the engine's own 'gptq' method"
        )

