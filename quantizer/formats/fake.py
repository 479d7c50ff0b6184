"""The ``fake`` format: an ordinary float checkpoint whose quantized layers hold their dequantized values.

Any tool that reads a float model reads it; useful to evaluate a quantization with float kernels."""

from __future__ import annotations

from typing import Any

import torch

from . import ExportFormat, ExportJob, QuantizedLayer, register_format
from .writer import save_format
from ..schemes import QuantScheme
from ..transforms.rotation import rotate_rows


@register_format
class FakeFormat(ExportFormat):
    name = "fake"
    description = ("float checkpoint holding the dequantized weights (no quantization_config; activation "
                   "quantization is not recorded); any float reader")
    lm_head = True
    tied_lm_head = True
    uniform = False
    model_free = False
    streams = True
    activations = True
    moe_experts = "fused"
    rotation = True  # each rotated layer's dequantized weight is written rotated back: W = W_rot T
    folds_rotation = True
    original_names = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        return None

    def layer_tensors(self, layer: QuantizedLayer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        w = layer.weight.dequantize()
        if layer.rotation is not None:
            w = rotate_rows(w, layer.rotation.matrix(), inverse=True)
        return {"weight": w.to(dtype or torch.float32)}

    def quantization_config(self, job: ExportJob) -> dict[str, Any] | None:
        return None

    def tensor_writer(self, job: ExportJob) -> Any:
        dtype = job.dtype or next(job.model.parameters()).dtype
        return lambda layer: self.layer_tensors(layer, dtype)

    def save(self, job: ExportJob, output_dir: str) -> str:
        return save_format(self, job, output_dir, self.tensor_writer(job), None)
