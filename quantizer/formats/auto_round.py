"""The ``auto_round`` checkpoint format (``quant_method: "auto-round"``) with its three packings.

- ``auto_round:auto_gptq`` (every layer symmetric): the GPTQ layout with the historic ``zp - 1`` zero point.
- ``auto_round:auto_awq`` (every layer asymmetric 4-bit with whole groups): the AWQ interleaved layout, as
  the reference tool writes asymmetric 4-bit by default.
- ``auto_round`` (anything else, e.g. asymmetric 2/3/8-bit or mixed): the GPTQ layout, zero points as is.
(``auto_round:mlx``, MLX's packing, is its own format module: ``formats/mlx.py``.)

Per-layer settings that differ from the default go to ``extra_config``; layers left in float get
``{"bits": 16}`` there; layers outside the quantized blocks (a quantized ``lm_head``) get their full scheme.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExportFormat, ExportJob, QuantizedLayer, autoround_version, register_format
from .packing import PACK_BITS, awq_layer_tensors, awq_whole_groups, gptq_layer_tensors
from .writer import save_format
from ..schemes import QuantScheme

PACKING_GPTQ = "auto_round:auto_gptq"
PACKING_AWQ = "auto_round:auto_awq"
PACKING_RAW_ZP = "auto_round"
PACKING_MLX = "auto_round:mlx"  # the ``auto_round:mlx`` format (``formats/mlx.py``); its checkpoints say "mlx"
# packing formats as spelled by other writers (and by the other quant methods we load), mapped to ours
PACKING_ALIASES = {
    "auto_round:gptq": PACKING_GPTQ,
    "auto_round:auto_gptq": PACKING_GPTQ,
    "auto_gptq": PACKING_GPTQ,
    "gptq": PACKING_GPTQ,
    "auto_round:auto_awq": PACKING_AWQ,
    "auto_round:awq": PACKING_AWQ,
    "auto_awq": PACKING_AWQ,
    "awq": PACKING_AWQ,
    "auto_round": PACKING_RAW_ZP,
    "auto_round:zp": PACKING_RAW_ZP,
    "mlx": PACKING_MLX,
    "auto_round:mlx": PACKING_MLX,
}


def zero_offset(packing_format: str) -> int:
    """What the format subtracts from a zero point before storing it (GPTQ v1 stores zp - 1)."""
    return 1 if PACKING_ALIASES.get(packing_format, packing_format) == PACKING_GPTQ else 0


def awq_packable(layer: QuantizedLayer) -> bool:
    s = layer.scheme
    gs = s.group_size
    return s.bits == 4 and not s.sym and awq_whole_groups(gs, layer.in_features) and layer.out_features % 8 == 0


def _in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


@register_format
class AutoRoundFormat(ExportFormat):
    name = "auto_round"
    description = "AutoRound (quant_method auto-round; GPTQ or AWQ int packing); transformers, vLLM, SGLang"
    lm_head = True
    tied_lm_head = True
    uniform = False
    model_free = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
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
        layers = list(job.layers.values())
        if all(layer.scheme.sym for layer in layers):
            return PACKING_GPTQ
        if all(awq_packable(layer) for layer in layers):
            return PACKING_AWQ
        return PACKING_RAW_ZP

    def layer_tensors(self, layer: QuantizedLayer, packing: str = PACKING_GPTQ) -> dict[str, torch.Tensor]:
        if packing == PACKING_AWQ:
            return awq_layer_tensors(layer.weight)
        return gptq_layer_tensors(layer.weight, zero_offset(packing))

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        default = job.scheme
        extra: dict[str, dict[str, Any]] = {}
        for name, layer in job.layers.items():
            keys = ("bits", "group_size", "sym", "data_type")
            if _in_blocks(name, job.block_names):
                diff = {k: getattr(layer.scheme, k) for k in keys if getattr(layer.scheme, k) != getattr(default, k)}
            else:  # e.g. lm_head: readers quantize only the blocks unless told otherwise
                diff = {k: getattr(layer.scheme, k) for k in keys}
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
            "autoround_version": autoround_version(),
            "provider": "autoround",
        }
        config.update(job.settings)
        if extra:
            config["extra_config"] = extra
        return config

    def save(self, job: ExportJob, output_dir: str) -> str:
        packing = self.packing_for(job)
        qconfig = self.quantization_config(job)
        return save_format(
            self, job, output_dir, lambda layer: self.layer_tensors(layer, packing), qconfig,
            {"quantization_config.json": qconfig},
        )


class _FixedPacking(AutoRoundFormat):
    """``auto_round`` with the packing named in the format (``--format auto_round:auto_gptq``) instead of the one
    the schemes pick; a scheme that packing cannot hold is refused before any work."""

    packing: str

    def packing_for(self, job: ExportJob) -> str:  # type: ignore[override]
        return self.packing


@register_format
class AutoRoundGptqPacking(_FixedPacking):
    name = PACKING_GPTQ
    description = "AutoRound with the GPTQ packing (zero point - 1, as GPTQ v1) for every layer: symmetric weights"
    packing = PACKING_GPTQ

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and not scheme.sym:
            return ("auto_round:auto_gptq stores zero point - 1 (GPTQ v1), which cannot hold an asymmetric zero "
                    "point of 0; use format auto_round (or auto_round:auto_awq for 4 bits)")
        return super().weights_error(scheme)


@register_format
class AutoRoundAwqPacking(_FixedPacking):
    name = PACKING_AWQ
    description = "AutoRound with the AWQ packing for every layer: 4-bit weights in whole groups"
    packing = PACKING_AWQ

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and scheme.data_type == "int" and scheme.bits != 4:
            return f"auto_round:auto_awq packs 4-bit weights only, not {scheme.bits}-bit; use format auto_round"
        return super().weights_error(scheme)

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        gs = scheme.group_size
        if not awq_whole_groups(gs, in_features):
            return f"{in_features} input features are not a whole number of groups of {gs} (AWQ packing)"
        return super().shape_error(scheme, in_features, out_features)
