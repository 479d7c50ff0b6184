"""The ``fp8`` format: FP8 weights in 2-D blocks as DeepSeek-V3-style checkpoints hold them
(``quant_method: "fp8"``), read by transformers' FineGrainedFP8 loader (which dequantizes on a CPU), vLLM and
SGLang.  Per quantized linear layer: ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` float32
``[ceil(out/128), ceil(in/128)]`` (the multiplier amax / 448 of each block, despite its name).  The config carries
``fmt: "e4m3"``, ``activation_scheme: "dynamic"``, ``weight_block_size`` and the float linear layers under both
``ignored_layers`` (vLLM's key, the reference's) and ``modules_to_not_convert`` (transformers').
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import ExportFormat, ExportJob, register_format
from .auto_round import float_layer_tensors, float_shape_error
from .writer import save_format
from ..dtypes import family_of
from ..schemes import QuantScheme


@register_format
class FP8BlockFormat(ExportFormat):
    name = "fp8"
    description = ("FP8 in 128x128 blocks with weight_scale_inv (quant_method fp8, DeepSeek-V3 layout): FP8_BLOCK; "
                   "transformers, vLLM, SGLang")
    lm_head = False
    uniform = True
    model_free = True
    streams = True
    activations = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if family_of(scheme).name != "fp8" or not isinstance(scheme.group_size, tuple):
            return f"the fp8 format holds FP8 weights in 2-D blocks (FP8_BLOCK), not {scheme.describe()}"
        if scheme.act_bits < 16:
            act = scheme.act_scheme()
            if family_of(act).name != "fp8" or not scheme.act_dynamic or scheme.act_bits != 8:
                return "the fp8 format records dynamic FP8 activations only (activation_scheme 'dynamic')"
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        return None if scheme.is_float else float_shape_error(scheme, in_features)

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        s = job.scheme
        quantized = set(job.layers)
        ignored = [n for n, m in job.model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        config: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(s.group_size),
            "bits": s.bits,
            "group_size": list(s.group_size),
            "data_type": s.data_type,
            "act_bits": s.act_bits,
        }
        if ignored:
            config["ignored_layers"] = ignored
            config["modules_to_not_convert"] = ignored
        return config

    def tensor_writer(self, job: ExportJob) -> Any:
        return float_layer_tensors

    def save(self, job: ExportJob, output_dir: str) -> str:
        return save_format(self, job, output_dir, self.tensor_writer(job), self.quantization_config(job))
