"""The ``auto_awq`` format (``quant_method: "awq"``, ``version: "gemm"``) read by AutoAWQ, GPTQModel,
transformers, vLLM and SGLang.

4-bit only, one scheme for every quantized layer (the config has one ``group_size``); layers left in float
are listed in ``modules_to_not_convert``.  Tensors per layer: ``qweight`` int32 ``[in, out/8]`` and
``qzeros`` int32 ``[groups, out/8]`` in the interleaved AWQ nibble order, ``scales`` fp16 ``[groups, out]``.
"""

from __future__ import annotations

from typing import Any

from . import ExportFormat, ExportJob, QuantizedLayer, group_size_of, register_format
from .packing import awq_layer_tensors, awq_whole_groups
from .writer import save_format
from ..schemes import QuantScheme


@register_format
class AutoAWQFormat(ExportFormat):
    name = "auto_awq"
    description = "AWQ GEMM (quant_method awq, 4-bit, interleaved packing); AutoAWQ, GPTQModel, transformers, vLLM"
    lm_head = False
    tied_lm_head = False
    uniform = True
    model_free = True
    streams = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if scheme.data_type != "int":
            return f"auto_awq stores integer weights, not {scheme.data_type!r}"
        if scheme.bits != 4:
            return f"the AWQ GEMM layout holds 4-bit weights only, not {scheme.bits}-bit"
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        gs = scheme.group_size
        if in_features % 32 or out_features % 32:
            return f"[{out_features} x {in_features}] is not a multiple of 32 in both dimensions"
        if not awq_whole_groups(gs, in_features):
            return f"{in_features} input channels are not a whole number of groups of {gs} (AWQ needs whole groups)"
        return None

    def layer_tensors(self, layer: QuantizedLayer) -> dict[str, Any]:
        return awq_layer_tensors(layer.weight)

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        # one group size for every layer: a layer narrower than a group has one group per row either way
        grouped = [group_size_of(layer) for layer in job.layers.values() if group_size_of(layer) != -1]
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": grouped[0] if grouped else -1,
            "zero_point": not job.scheme.sym,
            "version": "gemm",
            "modules_to_not_convert": list(job.float_layers) or None,
            "provider": "autoround",
        }

    def save(self, job: ExportJob, output_dir: str) -> str:
        return save_format(self, job, output_dir, self.layer_tensors, self.quantization_config(job))
