"""CPU kernels that keep weights packed: PyTorch's weight-only int4/int8 ops and auto-round-lib's ark.

All share ``TorchQuantLinear``'s constructor and checkpoint buffers (``qweight``/``qzeros``/``scales``/
``bias``, GPTQ layout, any zero-point offset); ``post_init()`` repacks into the kernel's own layout and
frees the checkpoint ``qweight``.  A ragged last group (``in_features % group_size != 0``) is padded
internally: padded input channels carry zero activations.

Facts about the torch 2.13 ops (checked on an AVX2 CPU):
- ``_convert_weight_to_int4pack_for_cpu(int32 [N, K] values 0..15, innerKTiles=1)`` -> uint8 ``[N, K/2]``;
  N must be a multiple of 16.
- ``_weight_int4pack_mm_for_cpu(x [M, K], packed, qGroupSize, scale_and_zeros [K/g, N, 2])`` computes
  ``x @ ((q - 8) * scale + zero)^T`` per group; ``qGroupSize`` in {32, 64, 128, 256}, K divisible by it;
  x and scale_and_zeros share one dtype (fp32/bf16/fp16).  Zero points go in as
  ``zero = (8 - zp) * scale``, which also lets 2- and 3-bit integers (0..7) run unchanged.
- ``_weight_int8pack_mm(x [M, K], int8 [N, K], scales [N])``: per-channel scales only, so the 8-bit kernel
  takes one group per row; an asymmetric zero point adds ``sum(x) * (128 - zp) * scale``.
- On a CPU without AVX512 both ops take a scalar path, far slower than fp32 dense (docs/benchmarks.md), so they are
  declared ``slow_on`` AVX2-only CPUs and ``auto`` skips them there (an explicit backend still runs them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory import release_pages
from .conversions import padded_group_layout, unpack_awq_words
from .torch_kernel import TorchQuantLinear

INT4PACK_GROUPS = (256, 128, 64, 32)


def _empty_like_buffers(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Drop buffers the repacked layout replaced; a buffer mapped from the checkpoint file also gives its pages
    back (the file's mapping, and the pages loading read, otherwise live as long as any tensor of the file)."""
    for name in names:
        buf = getattr(module, name)
        release_pages(buf)
        setattr(module, name, torch.empty(0, dtype=buf.dtype, device=buf.device))


class AwqLayout:
    """Mixin for AWQ-packed checkpoints (``auto_round:auto_awq``, ``awq``; 4-bit): ``qweight [in, out/8]`` and
    ``qzeros [groups, out/8]`` packed along the output dimension with the AWQ interleave, raw zero points.
    Put it before the kernel class: ``class X(AwqLayout, SomeKernel)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.bits != 4 or self.out_features % 8:
            raise ValueError(f"AWQ packing holds 4-bit weights with out_features % 8 == 0, got {self.bits}-bit "
                             f"[{self.out_features} x {self.in_features}]")
        device = self.scales.device
        self.register_buffer("qweight", torch.zeros(self.in_features, self.out_features // 8, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(self.n_groups, self.out_features // 8, dtype=torch.int32,
                                                   device=device))

    def int_weight(self) -> torch.Tensor:
        return unpack_awq_words(self.qweight)

    def zeros(self) -> torch.Tensor:
        return unpack_awq_words(self.qzeros).to(torch.int32)


class _RepackingLinear(TorchQuantLinear):
    """Shared plumbing: integers/zeros/scales out of the checkpoint buffers, once, in ``[out, in]`` order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed = False

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q int32 [out, in], zeros int32 [out, n_groups], scales fp32 [out, n_groups])."""
        q = self.int_weight().t().to(torch.int32)
        return q, self.zeros().t().contiguous(), self.scales.float().t().contiguous()

    def post_init(self) -> None:
        if self._packed:
            return
        self._repack()
        self._packed = True
        _empty_like_buffers(self, ("qweight",))  # the big one; scales/qzeros stay for inspection

    def _repack(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._packed:
            raise RuntimeError(f"{self.kernel_name} kernel: the weight was repacked by post_init()")
        return super().dequantize_weight(dtype)

    def _check_packed(self) -> None:
        if not self._packed:
            raise RuntimeError(f"{self.kernel_name} kernel: call post_init() after loading the weights")

    def _bias_to(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


class AtenInt4QuantLinear(_RepackingLinear):
    """2/3/4-bit weights through ``torch.ops.aten._weight_int4pack_mm_for_cpu``."""

    kernel_name = "torch_int4"

    def _repack(self) -> None:
        if self.bits > 4:
            raise ValueError(f"torch_int4 kernel runs 2/3/4-bit weights, got {self.bits}-bit")
        gs_pad, n_groups, k_pad = padded_group_layout(self.in_features, self.group_size, multiple=32)
        op_group = next((g for g in INT4PACK_GROUPS if gs_pad % g == 0), None)
        if op_group is None or self.out_features % 16:
            raise ValueError(
                f"torch_int4 kernel needs group sizes that are multiples of 32 and out_features % 16 == 0, "
                f"got group {self.group_size}, [{self.out_features} x {self.in_features}]"
            )
        q, z, s = self._unpacked()
        q = F.pad(q.view(self.out_features, -1), (0, k_pad - self.in_features), value=8)
        self.k_pad, self.op_group = k_pad, op_group
        self.register_buffer("packed_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        rep = gs_pad // op_group
        scale = s.t().repeat_interleave(rep, 0)  # [k_pad / op_group, out]
        zero = ((8 - z.float()) * s).t().repeat_interleave(rep, 0)
        self.register_buffer("scale_and_zeros", torch.stack([scale, zero], dim=-1).contiguous())
        self._sz_cache: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed()
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        sz = self._sz_cache.get(dtype)
        if sz is None:
            sz = self._sz_cache[dtype] = self.scale_and_zeros.to(dtype)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed_weight, self.op_group, sz)
        return self._bias_to(y).reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class AtenInt8QuantLinear(_RepackingLinear):
    """8-bit weights with one group per row through ``torch.ops.aten._weight_int8pack_mm``."""

    kernel_name = "torch_int8"

    def _repack(self) -> None:
        if self.bits != 8:
            raise ValueError(f"torch_int8 kernel runs 8-bit weights, got {self.bits}-bit")
        if self.n_groups != 1:
            raise ValueError("torch_int8 kernel takes one group per row (group_size -1), got "
                             f"{self.n_groups} groups")
        q, z, s = self._unpacked()
        self.register_buffer("packed_weight", (q - 128).to(torch.int8).contiguous())
        self.register_buffer("channel_scale", s[:, 0].contiguous())
        zero = (128 - z[:, 0].float()) * s[:, 0]
        self.register_buffer("channel_zero", zero if bool((z != 128).any()) else torch.empty(0))
        self._cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed()
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        cached = self._cache.get(dtype)
        if cached is None:
            cached = self._cache[dtype] = (self.channel_scale.to(dtype), self.channel_zero.to(dtype))
        scale, zero = cached
        x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.packed_weight, scale)
        if zero.numel():
            y = y + x2.sum(-1, keepdim=True) * zero
        return self._bias_to(y).reshape(*x.shape[:-1], self.out_features).to(x.dtype)


ARK_BITS = {2: "int2", 4: "int4", 8: "int8"}


class ArkQuantLinear(_RepackingLinear):
    """2/4/8-bit weights through auto-round-lib's CPU kernel (``auto_round_kernel``), computing in fp32.

    ark wants signed integers ``q - 2**(bits-1)`` ``[in, out]``, fp32 scales ``[groups, out]`` and, for
    asymmetric weights, signed zero points; it needs whole groups, so a ragged last group is padded.
    """

    kernel_name = "ark"
    compute_type = "fp32"  # "auto" may quantize activations to int8 on VNNI CPUs: not W-only semantics

    def _repack(self) -> None:
        import auto_round_kernel as ark

        bits = self.bits
        gs_pad, n_groups, k_pad = padded_group_layout(self.in_features, self.group_size, multiple=32)
        q, z, s = self._unpacked()
        half = 1 << (bits - 1)
        self.asym = bool((z != half).any())
        qb = F.pad(q - half, (0, k_pad - self.in_features)).t().to(torch.int8).contiguous()  # [k_pad, out]
        zp = (z - half).t().to(torch.int8).contiguous() if self.asym else torch.empty(0, dtype=torch.int8)
        self.k_pad, self.ark_group = k_pad, gs_pad
        blob = ark.repack_quantized_weight(
            qb, s.t().contiguous(), zp, gs_pad, self.compute_type, ARK_BITS[bits], "fp32", self.asym
        )
        self.register_buffer("packed_weight", blob)
        self._ark = ark
        self._no_bias = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed()
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        bias = self._no_bias if self.bias is None else self.bias.float()
        y = self._ark.woqgemm(
            x2.contiguous(), self.packed_weight, bias, self.out_features, self.k_pad, self.ark_group,
            self.compute_type, ARK_BITS[self.bits], "fp32", self.asym,
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class ArkAwqQuantLinear(AwqLayout, ArkQuantLinear):
    kernel_name = "ark_awq"
