"""The ``llm_compressor`` format: compressed-tensors checkpoints (``quant_method: "compressed-tensors"``), read by
compressed-tensors + transformers, vLLM and SGLang.  One ``config_groups`` entry per distinct (weights,
input_activations, format); every other linear layer is in ``ignore``; the top-level ``format`` is the groups'
one, or ``mixed-precision``.

- ``pack-quantized`` (integer weight-only): ``weight_packed`` int32 ``[out, in * bits / 32]`` (the integers as a bit
  stream along each row; signed values offset by ``2**(bits-1)``, i.e. this project's unsigned integers),
  ``weight_scale`` ``[out, groups]`` in the checkpoint's float dtype, ``weight_shape`` int64 ``[2]`` and, for
  asymmetric schemes, ``weight_zero_point`` int32 ``[out * bits / 32, groups]`` (packed along the output dimension).
  Strategy ``group`` (group_size > 0) or ``channel`` (-1).
- ``int-quantized`` (INT8_W8A8): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``; dynamic per-token
  int8 ``input_activations``.
- ``float-quantized`` (FP8): ``weight`` float8_e4m3fn, ``weight_scale`` float32 (``[1]`` tensor, ``[out, 1]``
  channel, ``[out, groups]`` group, ``[out/128, in/128]`` block), ``input_scale`` float32 ``[1]`` for static
  activations (calibrated max / 448).
- ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]`` (E2M1 codes, even column in the low nibble),
  ``weight_scale`` float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` float32 ``[1]`` (the divisor
  ``448·6/amax``), ``input_global_scale`` float32 ``[1]`` for NVFP4 activations.
- ``mxfp4-pack-quantized`` / ``mxfp8-quantized``: ``weight_packed`` uint8 (E2M1) or ``weight`` float8_e4m3fn,
  ``weight_scale`` uint8 E8M0 exponents (``log2(scale) + 127``) ``[out, in/32]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ExportFormat, ExportJob, QuantizedLayer, register_format
from .auto_round import float_layer_tensors, float_packing, float_shape_error, float_weights_error
from .packing import pack_rows
from .writer import save_format
from ..dtypes import family_of
from ..dtypes.floats import fp8_static_input_scale
from ..qmath import ROUND_WITH_STORED
from ..schemes import QuantScheme

BITS = (4, 8)
FORMAT = "pack-quantized"


def _int_weights_args(layer: QuantizedLayer) -> dict[str, Any]:
    s = layer.scheme
    per_channel = s.group_size in (-1, 0) or s.group_size >= layer.in_features
    return {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.sym,
        "group_size": None if per_channel else s.group_size,
        "strategy": "channel" if per_channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _float_weights_args(layer: QuantizedLayer) -> dict[str, Any]:
    s, family = layer.scheme, family_of(layer.scheme).name
    args: dict[str, Any] = {"num_bits": s.bits, "type": "float", "symmetric": True, "dynamic": False}
    if family == "nvfp":
        args.update(group_size=16, strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
    elif family == "mx":
        args.update(group_size=32, strategy="group", scale_dtype="torch.uint8")
    elif isinstance(s.group_size, tuple):
        args.update(group_size=None, strategy="block", block_structure=list(s.group_size))
    elif s.group_size == 0:
        args.update(group_size=None, strategy="tensor")
    elif s.group_size == -1 or s.group_size >= layer.in_features:
        args.update(group_size=None, strategy="channel")
    else:
        args.update(group_size=s.group_size, strategy="group")
    return args


def _input_args(scheme: QuantScheme) -> dict[str, Any] | None:
    """compressed-tensors' ``input_activations`` for ``scheme``'s activation quantization (None: A16)."""
    if scheme.act_bits >= 16:
        return None
    act = scheme.act_scheme()
    family = family_of(act).name
    args: dict[str, Any] = {"num_bits": act.bits, "type": "int" if family == "int" else "float",
                            "symmetric": act.sym, "dynamic": scheme.act_dynamic}
    if family == "nvfp":
        args.update(group_size=16, strategy="tensor_group", dynamic="local", scale_dtype="torch.float8_e4m3fn",
                    observer="static_minmax")
    elif family == "mx":
        args.update(group_size=32, strategy="group", scale_dtype="torch.uint8")
    elif act.group_size == -1:
        args.update(group_size=None, strategy="token")
    elif act.group_size == 0:
        args.update(group_size=None, strategy="tensor")
        if not scheme.act_dynamic:
            args["observer"] = "static_minmax"
    else:
        args.update(group_size=act.group_size, strategy="group")
    return args


def _compression_format(scheme: QuantScheme) -> str:
    family = family_of(scheme).name
    if family == "int":
        return "int-quantized" if scheme.act_bits < 16 else FORMAT
    if family == "nvfp":
        return "nvfp4-pack-quantized"
    if family == "mx":
        return "mxfp4-pack-quantized" if scheme.bits == 4 else "mxfp8-quantized"
    return "float-quantized"


@register_format
class LLMCompressorFormat(ExportFormat):
    name = "llm_compressor"
    description = ("compressed-tensors: pack-quantized (W4A16/W8A16), int-quantized (INT8_W8A8), float-quantized "
                   "(FP8), nvfp4-pack-quantized (NVFP4), mxfp4-pack-quantized / mxfp8-quantized (MXFP4/MXFP8); "
                   "compressed-tensors + transformers, vLLM, SGLang")
    lm_head = True
    tied_lm_head = False
    uniform = False
    model_free = True
    streams = True
    activations = True
    # the reference's llm_compressor export re-quantizes each layer through compressed-tensors with the stored
    # scale, so plain RTN rounds with it here too (INT8_W8A8: 0.2% of the integers differ from the float32 rule)
    rtn_rounding = ROUND_WITH_STORED

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        family = family_of(scheme).name
        if family == "int":
            if scheme.act_bits < 16:
                act = scheme.act_scheme()
                if (scheme.bits, scheme.group_size, act.bits, act.data_type) != (8, -1, 8, "int") or not act.sym \
                        or not scheme.sym:
                    return ("int-quantized is written for INT8 weights per channel with INT8 symmetric activations "
                            "(INT8_W8A8)")
                return None
            if scheme.bits not in BITS:
                return f"the llm_compressor export writes W4A16/W8A16 (4 or 8 bits), not {scheme.bits}-bit"
            if scheme.group_size == 0:
                return "per-tensor scales (group_size 0) are not written; use -1 (per channel) or a group size"
            return None
        if family == "mx" and scheme.data_type == "mx_int":
            return "compressed-tensors has no MX integer (MXINT4) format"
        if family not in ("mx", "nvfp", "fp8"):
            return f"compressed-tensors stores int, MXFP, NVFP4 and FP8 weights, not {scheme.data_type!r}"
        return float_weights_error(scheme)

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        gs = scheme.group_size
        if not scheme.is_float and float_packing(scheme) is not None:
            return float_shape_error(scheme, in_features)
        if scheme.act_bits < 16:
            return None
        if in_features % 32 or out_features % 32:
            return f"[{out_features} x {in_features}] is not a multiple of 32 in both dimensions"
        if 0 < gs < in_features and in_features % gs:
            return f"{in_features} input channels are not a whole number of groups of {gs}"
        return None

    def layer_tensors(self, layer: QuantizedLayer, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        qw = layer.weight
        family = family_of(layer.scheme).name
        if family == "int" and layer.scheme.act_bits < 16:  # int-quantized: signed int8 weights, one scale a row
            return {"weight": (qw.qweight.to(torch.int16) - 128).to(torch.int8),
                    "weight_scale": qw.scale.reshape(-1, 1).to(dtype)}
        if family == "int":
            out = {
                "weight_packed": pack_rows(qw.qweight, qw.bits),
                "weight_scale": qw.scale.contiguous().to(dtype),
                "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
            }
            if not qw.sym:
                out["weight_zero_point"] = pack_rows(qw.zero.t().contiguous(), qw.bits).t().contiguous()
            return out
        if family in ("nvfp", "mx"):  # the same tensors as the reference's auto_round:llm_compressor packing
            return float_layer_tensors(layer)
        # FP8: E4M3 weights, float32 scales in compressed-tensors' shape for the strategy
        out = {"weight": qw.codes.view(torch.float8_e4m3fn)}
        strategy = _float_weights_args(layer)["strategy"]
        scale = qw.scale.to(torch.float32)
        out["weight_scale"] = scale.reshape(1) if strategy == "tensor" else scale.contiguous()
        if layer.scheme.act_bits < 16 and not layer.scheme.act_dynamic:
            out["input_scale"] = fp8_static_input_scale(layer.input_amax)
        return out

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for name, layer in job.layers.items():
            float_w = family_of(layer.scheme).name != "int"
            args = {"weights": _float_weights_args(layer) if float_w else _int_weights_args(layer),
                    "input_activations": _input_args(layer.scheme), "format": _compression_format(layer.scheme)}
            key = repr(args)
            groups.setdefault(key, (args, []))[1].append(name)
        quantized = set(job.layers)
        ignore = [n for n, m in job.model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        single = len(groups) == 1
        config_groups = {
            f"group_{i}": {
                "targets": ["Linear"] if single else names,
                "weights": args["weights"],
                "input_activations": args["input_activations"],
                "output_activations": None,
                "format": args["format"],
            }
            for i, (args, names) in enumerate(groups.values())
        }
        fmts = {g["format"] for g in config_groups.values()}
        return {
            "quant_method": "compressed-tensors",
            "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.0",
            "provider": "autoround",
        }

    def tensor_writer(self, job: ExportJob) -> Any:
        dtype = job.dtype or next(job.model.parameters()).dtype
        return lambda layer: self.layer_tensors(layer, dtype)

    def save(self, job: ExportJob, output_dir: str) -> str:
        return save_format(self, job, output_dir, self.tensor_writer(job), self.quantization_config(job))
