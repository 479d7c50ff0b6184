"""The pure-torch kernel for MLX's packing (``auto_round:mlx`` checkpoints loaded through transformers).

MLX's QuantizedLinear stores ``weight`` uint32 ``[out, in * bits / 32]`` (a little-endian bit stream along each
row), ``scales`` and ``biases`` ``[out, groups]``, and computes w = scales * q + biases; this kernel computes
exactly that (then the matmul in the activation dtype), for the bit widths and group sizes MLX has.
"""

from __future__ import annotations

import torch
from torch import nn

from autoround.quantizer.formats.packing import unpack_mlx_weight

from .torch_kernel import TorchQuantLinear


class TorchMlxQuantLinear(TorchQuantLinear):
    """``weight``/``scales``/``biases`` in MLX's layout, dequantized per call."""

    kernel_name = "torch_mlx"
    checkpoint_tensors = ("weight", "scales", "biases")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool,
        zero_offset: int = 0,
        scale_dtype: torch.dtype = torch.float32,  # holds float16 and float32 checkpoint scales/biases exactly
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if group_size <= 0 or in_features % group_size:
            raise ValueError(
                f"MLX layers hold whole groups: {in_features} input channels and group_size {group_size}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.zero_offset = zero_offset
        self.n_groups = in_features // group_size
        words = in_features * bits // 32
        self.register_buffer("weight", torch.zeros(out_features, words, dtype=torch.uint32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("biases", torch.zeros(out_features, self.n_groups, dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def post_init(self) -> None:
        """Unpack the bit stream once (one byte per weight, kept beside the packed words) so that each call only
        scales and shifts: unpacking 3/5/6-bit streams per call costs more than the matmul."""
        self._q = unpack_mlx_weight(self.weight, self.bits, self.in_features)

    def _ints(self) -> torch.Tensor:
        q = getattr(self, "_q", None)
        return q if q is not None else unpack_mlx_weight(self.weight, self.bits, self.in_features)

    def int_weight(self) -> torch.Tensor:
        """Stored integers as uint8 ``[in, out]`` (the base class's orientation)."""
        return self._ints().t()

    def zeros(self) -> torch.Tensor:
        raise NotImplementedError("MLX layers store biases (-scale * zero), not integer zero points")

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[in, out]``: scales * q + biases, computed in float32."""
        q = self._ints().to(torch.float32)
        shape = (self.out_features, self.n_groups, self.group_size)
        w = q.view(shape) * self.scales.to(torch.float32).unsqueeze(-1) + self.biases.to(torch.float32).unsqueeze(-1)
        return w.view(self.out_features, self.in_features).t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._ints().to(torch.float32).view(self.out_features, self.n_groups, self.group_size)
        w = q * self.scales.to(torch.float32).unsqueeze(-1) + self.biases.to(torch.float32).unsqueeze(-1)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w.view(self.out_features, self.in_features).to(x.dtype), bias)
