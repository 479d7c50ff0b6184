"""The ``llm_compressor`` format: compressed-tensors ``pack-quantized`` (``quant_method:
"compressed-tensors"``), read by compressed-tensors + transformers, vLLM and SGLang.

Tensors per layer: ``weight_packed`` int32 ``[out, in * bits / 32]`` (the integers as a bit stream along
each row; signed values offset by ``2**(bits-1)``, i.e. this project's unsigned integers), ``weight_scale``
``[out, groups]`` in the checkpoint's float dtype, ``weight_shape`` int64 ``[2]`` and, for asymmetric
schemes, ``weight_zero_point`` int32 ``[out * bits / 32, groups]`` (signed zero points offset the same
way, packed along the output dimension).  Strategy ``group`` (group_size > 0) or ``channel`` (-1).
Layers sharing a scheme share one ``config_groups`` entry; every other linear layer is in ``ignore``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ExportFormat, ExportJob, QuantizedLayer, register_format
from .packing import pack_rows
from .writer import save_format
from ..schemes import QuantScheme

BITS = (4, 8)
FORMAT = "pack-quantized"


def _weights_args(layer: QuantizedLayer) -> dict[str, Any]:
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


@register_format
class LLMCompressorFormat(ExportFormat):
    name = "llm_compressor"
    description = "compressed-tensors pack-quantized (W4A16/W8A16); compressed-tensors + transformers, vLLM, SGLang"
    lm_head = True
    tied_lm_head = False
    uniform = False
    model_free = True

    def scheme_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if scheme.data_type != "int":
            return f"pack-quantized stores integer weights, not {scheme.data_type!r}"
        if scheme.bits not in BITS:
            return f"the llm_compressor export writes W4A16/W8A16 (4 or 8 bits), not {scheme.bits}-bit"
        if scheme.group_size == 0:
            return "per-tensor scales (group_size 0) are not written; use -1 (per channel) or a group size"
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        gs = scheme.group_size
        if in_features % 32 or out_features % 32:
            return f"[{out_features} x {in_features}] is not a multiple of 32 in both dimensions"
        if 0 < gs < in_features and in_features % gs:
            return f"{in_features} input channels are not a whole number of groups of {gs}"
        return None

    def layer_tensors(self, layer: QuantizedLayer, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        qw = layer.weight
        out = {
            "weight_packed": pack_rows(qw.qweight, qw.bits),
            "weight_scale": qw.scale.contiguous().to(dtype),
            "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
        }
        if not qw.sym:
            out["weight_zero_point"] = pack_rows(qw.zero.t().contiguous(), qw.bits).t().contiguous()
        return out

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for name, layer in job.layers.items():
            args = _weights_args(layer)
            key = repr(sorted(args.items()))
            groups.setdefault(key, (args, []))[1].append(name)
        quantized = set(job.layers)
        ignore = [n for n, m in job.model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        single = len(groups) == 1
        config_groups = {
            f"group_{i}": {
                "targets": ["Linear"] if single else names,
                "weights": args,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
            for i, (args, names) in enumerate(groups.values())
        }
        return {
            "quant_method": "compressed-tensors",
            "format": FORMAT,
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

    def save(self, job: ExportJob, output_dir: str) -> str:
        dtype = job.dtype or next(job.model.parameters()).dtype
        return save_format(
            self, job, output_dir, lambda layer: self.layer_tensors(layer, dtype), self.quantization_config(job)
        )
