"""Inference kernels for quantized linear layers, and the selector that picks one per layer."""

from __future__ import annotations

from .selector import KernelInfo, LayerSpec, kernels, register_kernel, select_kernel
from .torch_kernel import TorchQuantLinear

PACKINGS_GPTQ_LAYOUT = ("auto_round:auto_gptq", "auto_round")

register_kernel(
    KernelInfo(
        name="torch",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=(2, 3, 4, 8),
        packing_formats=PACKINGS_GPTQ_LAYOUT,
        factory=TorchQuantLinear,
    )
)

__all__ = ["KernelInfo", "LayerSpec", "TorchQuantLinear", "kernels", "register_kernel", "select_kernel"]
