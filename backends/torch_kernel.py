"""The pure-torch reference kernel: keeps GPTQ-layout packed weights, dequantizes per call, then matmul.

Runs on every torch device, 2/3/4/8 bits, any group size including a ragged last group.  Every other
kernel is tested against this one.
"""

from __future__ import annotations

import torch
from torch import nn

from autoround.quantizer.formats.packing import unpack_gptq_qzeros, unpack_stream
from autoround.quantizer.qmath import group_layout


class TorchQuantLinear(nn.Module):
    """A linear layer whose weight is stored as ``qweight``/``qzeros``/``scales`` (GPTQ layout), and the base
    class of every kernel (``register_kernel`` refuses a factory that is not a subclass).

    The contract a kernel keeps: this constructor (the loader calls it with the checkpoint's layer shape and
    scheme) and its buffers, which the checkpoint's tensors are loaded into; ``packed_shapes`` for another
    checkpoint layout (AWQ); ``post_init`` to repack or hand the tensors to a library once they are loaded;
    ``forward`` equal to ``dequantize_weight`` then matmul, within the kernel's compute precision (every kernel
    is tested against this one)."""

    kernel_name = "torch"
    # the checkpoint tensors of one layer in this kernel's layout (besides ``bias``), as the loader looks for them
    checkpoint_tensors: tuple[str, ...] = ("qweight", "qzeros", "scales")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool,
        zero_offset: int = 1,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.zero_offset = zero_offset
        _, n_groups = group_layout(in_features, group_size)
        self.n_groups = n_groups
        qweight_shape, qzeros_shape = self.packed_shapes(in_features, out_features, bits, n_groups)
        self.register_buffer("qweight", torch.zeros(qweight_shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(qzeros_shape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @staticmethod
    def packed_shapes(in_features: int, out_features: int, bits: int, n_groups: int) -> tuple[tuple, tuple]:
        """Shapes of ``qweight`` and ``qzeros`` in this kernel's checkpoint layout (GPTQ here)."""
        return (in_features * bits // 32, out_features), (n_groups, out_features * bits // 32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, kernel={self.kernel_name}"
        )

    def int_weight(self) -> torch.Tensor:
        """Stored integers as uint8 ``[in, out]``."""
        return unpack_stream(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """True zero points as int32 ``[n_groups, out]`` (the format's offset undone)."""
        z = unpack_gptq_qzeros(self.qzeros, self.bits, self.out_features).to(torch.int32) + self.zero_offset
        return z & ((1 << self.bits) - 1) if self.zero_offset else z

    def group_index(self) -> torch.Tensor:
        gs, _ = group_layout(self.in_features, self.group_size)
        return torch.arange(self.in_features, device=self.qweight.device) // gs

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[in, out]``."""
        g = self.group_index()
        q = self.int_weight().to(dtype)
        z = self.zeros().to(dtype)[g]
        s = self.scales.to(dtype)[g]
        return (q - z) * s

    def post_init(self) -> None:
        """Called after the weights are loaded (repacking kernels override it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight(x.dtype)
        y = torch.matmul(x, w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
