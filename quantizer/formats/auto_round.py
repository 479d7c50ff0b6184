"""The ``auto_round`` checkpoint format (``quant_method: "auto-round"``), GPTQ-style int packing.

Packing ``auto_round:auto_gptq`` (all layers symmetric): the GPTQ layout with the historic ``zp - 1`` zero
point offset.  Packing ``auto_round`` (some layer asymmetric): the same layout, zero points stored as is.
Per-layer settings that differ from the default go to ``extra_config``; layers left in float get
``{"bits": 16}`` there.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExportJob, QuantizedLayer, register_format
from .packing import PACK_BITS, pack_gptq_qweight, pack_gptq_qzeros
from .writer import float_state_dict, write_checkpoint
from ..schemes import QuantScheme

PACKING_GPTQ = "auto_round:auto_gptq"
PACKING_RAW_ZP = "auto_round"
# packing formats as spelled by other writers, mapped to ours
PACKING_ALIASES = {
    "auto_round:gptq": PACKING_GPTQ,
    "auto_round:auto_gptq": PACKING_GPTQ,
    "auto_gptq": PACKING_GPTQ,
    "gptq": PACKING_GPTQ,
    "auto_round": PACKING_RAW_ZP,
    "auto_round:zp": PACKING_RAW_ZP,
}


def zero_offset(packing_format: str) -> int:
    """What the format subtracts from a zero point before storing it (GPTQ v1 stores zp - 1)."""
    return 1 if PACKING_ALIASES.get(packing_format, packing_format) == PACKING_GPTQ else 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoround")
    except PackageNotFoundError:
        return "0+unknown"


@register_format
class AutoRoundFormat:
    name = "auto_round"
    description = "AutoRound checkpoint (quant_method auto-round, GPTQ-layout int packing); transformers, vLLM, SGLang"

    def scheme_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if scheme.data_type != "int":
            return f"auto_round stores integer weights, not {scheme.data_type!r}"
        if scheme.bits not in PACK_BITS:
            return (
                f"{scheme.bits}-bit weights cannot be packed in the GPTQ layout that auto_round uses; "
                f"valid bits: {', '.join(map(str, PACK_BITS))}"
            )
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        if in_features % 32 or out_features % 32:
            return f"[{out_features} x {in_features}] is not a multiple of 32 in both dimensions"
        return None

    @staticmethod
    def packing_for(job: ExportJob) -> str:
        all_sym = all(layer.scheme.sym for layer in job.layers.values())
        return PACKING_GPTQ if all_sym else PACKING_RAW_ZP

    def layer_tensors(self, layer: QuantizedLayer, packing: str = PACKING_GPTQ) -> dict[str, torch.Tensor]:
        qw = layer.weight
        zeros = qw.zero.t().contiguous() - zero_offset(packing)  # [n_groups, out]
        zeros = zeros & ((1 << qw.bits) - 1)  # a -1 (asym zp 0 under zp-1) wraps as GPTQ v1 does
        return {
            "qweight": pack_gptq_qweight(qw.qweight, qw.bits),
            "qzeros": pack_gptq_qzeros(zeros, qw.bits),
            "scales": qw.scale.t().contiguous().to(torch.float16),
        }

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        default = job.scheme
        extra: dict[str, dict[str, Any]] = {}
        for name, layer in job.layers.items():
            diff = {
                k: getattr(layer.scheme, k)
                for k in ("bits", "group_size", "sym", "data_type")
                if getattr(layer.scheme, k) != getattr(default, k)
            }
            if diff:
                extra[name] = diff
        for name in job.float_layers:
            extra[name] = {"bits": 16, "data_type": "float"}
        config: dict[str, Any] = {
            "quant_method": "auto-round",
            "packing_format": self.packing_for(job),
            "bits": default.bits,
            "group_size": default.group_size,
            "sym": default.sym,
            "data_type": default.data_type,
            "act_bits": default.act_bits,
            "block_name_to_quantize": ",".join(job.block_names),
            "autoround_version": _version(),
            "provider": "autoround",
        }
        config.update(job.settings)
        if extra:
            config["extra_config"] = extra
        return config

    def save(self, job: ExportJob, output_dir: str) -> str:
        packing = self.packing_for(job)
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in float_state_dict(job.model).items():
            layer_name, _, suffix = name.rpartition(".")
            if layer_name in job.layers and suffix == "weight":
                continue
            if job.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(job.dtype)
            tensors[name] = tensor
        for name, layer in job.layers.items():
            for suffix, t in self.layer_tensors(layer, packing).items():
                tensors[f"{name}.{suffix}"] = t
            if layer.bias is not None:
                tensors[f"{name}.bias"] = layer.bias.to(job.dtype or layer.bias.dtype)
        qconfig = self.quantization_config(job)
        return str(
            write_checkpoint(
                output_dir,
                model=job.model,
                tensors=tensors,
                quantization_config=qconfig,
                tokenizer=job.tokenizer,
                extra_json={"quantization_config.json": qconfig},
            )
        )
