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

# --- AWQ layout: the pure-torch reference kernel (issue 4) ---
from .torch_awq_kernel import TorchAWQQuantLinear  # noqa: E402

register_kernel(
    KernelInfo(
        name="torch_awq",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=(4,),
        packing_formats=("auto_round:auto_awq", "awq"),
        factory=TorchAWQQuantLinear,
    )
)

__all__ = [
    "KernelInfo", "LayerSpec", "TorchAWQQuantLinear", "TorchQuantLinear", "kernels", "register_kernel",
    "select_kernel",
]
