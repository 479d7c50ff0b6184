"""The pure-torch reference kernel for the AWQ layout (``auto_round:auto_awq`` and AutoAWQ ``gemm``
checkpoints): keeps the interleaved 4-bit words, dequantizes per call, then matmul.

Same constructor, buffers-after-load, ``post_init()`` and ``forward`` contract as ``TorchQuantLinear`` (it is
one, with the AWQ buffer layout); faster AWQ kernels are tested against this one."""

from __future__ import annotations

import torch

from autoround.quantizer.formats.packing import unpack_awq

from .torch_kernel import TorchQuantLinear


class TorchAWQQuantLinear(TorchQuantLinear):
    """A linear layer whose weight is stored as AWQ ``qweight [in, out/8]``/``qzeros``/``scales``."""

    kernel_name = "torch_awq"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, bias: bool,
                 zero_offset: int = 0, **kwargs) -> None:
        if bits != 4:
            raise ValueError(f"the AWQ layout holds 4-bit weights only, not {bits}-bit")
        if out_features % 8:
            raise ValueError(f"the AWQ layout needs out_features divisible by 8, got {out_features}")
        super().__init__(in_features, out_features, bits, group_size, sym, bias, zero_offset=zero_offset, **kwargs)

    @staticmethod
    def packed_shapes(in_features: int, out_features: int, bits: int, n_groups: int) -> tuple[tuple, tuple]:
        return (in_features, out_features // 8), (n_groups, out_features // 8)

    def int_weight(self) -> torch.Tensor:
        """Stored integers as uint8 ``[in, out]``."""
        return unpack_awq(self.qweight)

    def zeros(self) -> torch.Tensor:
        """Zero points as int32 ``[n_groups, out]`` (AWQ stores them as they are)."""
        return unpack_awq(self.qzeros).to(torch.int32) + self.zero_offset
