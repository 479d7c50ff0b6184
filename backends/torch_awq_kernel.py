"""The pure-torch reference kernel for the AWQ layout (``auto_round:auto_awq`` and AutoAWQ ``gemm``
checkpoints): keeps the interleaved 4-bit words, dequantizes per call, then matmul.

Same constructor, buffers-after-load, ``post_init()`` and ``forward`` contract as ``TorchQuantLinear``;
faster AWQ kernels are tested against this one."""

from __future__ import annotations

import torch
from torch import nn

from autoround.quantizer.formats.packing import unpack_awq
from autoround.quantizer.qmath import group_layout


class TorchAWQQuantLinear(nn.Module):
    """A linear layer whose weight is stored as AWQ ``qweight [in, out/8]``/``qzeros``/``scales``."""

    kernel_name = "torch_awq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool,
        zero_offset: int = 0,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits != 4:
            raise ValueError(f"the AWQ layout holds 4-bit weights only, not {bits}-bit")
        if out_features % 8:
            raise ValueError(f"the AWQ layout needs out_features divisible by 8, got {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.zero_offset = zero_offset
        _, n_groups = group_layout(in_features, group_size)
        self.n_groups = n_groups
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, kernel={self.kernel_name}"
        )

    def int_weight(self) -> torch.Tensor:
        """Stored integers as uint8 ``[in, out]``."""
        return unpack_awq(self.qweight)

    def zeros(self) -> torch.Tensor:
        """Zero points as int32 ``[n_groups, out]``."""
        return unpack_awq(self.qzeros).to(torch.int32) + self.zero_offset

    def group_index(self) -> torch.Tensor:
        gs, _ = group_layout(self.in_features, self.group_size)
        return torch.arange(self.in_features, device=self.qweight.device) // gs

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[in, out]``."""
        g = self.group_index()
        q = self.int_weight().to(dtype)
        return (q - self.zeros().to(dtype)[g]) * self.scales.to(dtype)[g]

    def post_init(self) -> None:
        """Called after the weights are loaded (repacking kernels override it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.dequantize_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
