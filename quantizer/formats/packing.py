"""Bit packing of integer tensors into int32 words.  Pure tensor code.

GPTQ layout (``auto_gptq`` and ``auto_round:auto_gptq``): values form one continuous little-endian bit
stream along the packed dimension; value ``j`` starts at bit ``j * bits``.  For 2, 4 and 8 bits no value
crosses a word; for 3 bits this is GPTQ's cross-word layout (10 values, one split, 10, one split, 10 per
three words).  ``qweight`` packs along the input dimension, ``qzeros`` along the output dimension.
The same stream along each row of ``[out, in]`` is compressed-tensors' ``pack-quantized`` layout and MLX's
(``mx.quantize``: 2, 3, 4, 5, 6 and 8 bits, value ``j`` of a row at bit ``j * bits``, words stored as uint32).
"""

from __future__ import annotations

import math

import torch

PACK_BITS = (2, 3, 4, 8)  # what the GPTQ layout's readers unpack
STREAM_BITS = (2, 3, 4, 5, 6, 7, 8)  # what the bit stream itself can hold


def _check(bits: int, length: int, what: str) -> None:
    if bits not in STREAM_BITS:
        raise ValueError(f"{bits}-bit values cannot be packed in a bit stream; valid bits: {STREAM_BITS}")
    if (length * bits) % 32:
        raise ValueError(
            f"{what} of length {length} at {bits} bits does not fill whole 32-bit words "
            f"(needs a multiple of {32 // math.gcd(32, bits)})"
        )


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ints along dim 0: ``[n, m]`` -> int32 ``[n * bits / 32, m]``."""
    n = values.shape[0]
    _check(bits, n, "the packed dimension")
    v = values.to(torch.int64) & ((1 << bits) - 1)
    words = torch.zeros((n * bits // 32 + 1,) + tuple(values.shape[1:]), dtype=torch.int64, device=values.device)
    offsets = torch.arange(n, device=values.device) * bits
    word, shift = offsets // 32, offsets % 32
    shape = (-1,) + (1,) * (values.dim() - 1)
    low = (v << shift.view(shape)) & 0xFFFFFFFF
    words.index_add_(0, word, low)
    spill = shift + bits > 32  # values of a width that does not divide 32 (3, 5, 6, 7) straddle words
    if spill.any():
        hi = v[spill] >> (32 - shift[spill]).view(shape)
        words.index_add_(0, word[spill] + 1, hi)
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_stream``: int32 ``[n * bits / 32, m]`` -> uint8 ``[n, m]``."""
    _check(bits, n, "the packed dimension")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])], dim=0)
    offsets = torch.arange(n, device=words.device) * bits
    word, shift = offsets // 32, offsets % 32
    shape = (-1,) + (1,) * (words.dim() - 1)
    combined = w[word] | (w[word + 1] << 32)
    return ((combined >> shift.view(shape)) & ((1 << bits) - 1)).to(torch.uint8)


def pack_gptq_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[out, in]`` -> int32 ``[in * bits / 32, out]`` (packed along the input dimension)."""
    return pack_stream(q.t(), bits).contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 ``[in * bits / 32, out]`` -> uint8 ``[out, in]``."""
    return unpack_stream(qweight, bits, in_features).t().contiguous()


def pack_gptq_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """int ``[n_groups, out]`` (already offset as the format wants) -> int32 ``[n_groups, out * bits / 32]``."""
    return pack_stream(zeros.t(), bits).t().contiguous()


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """int32 ``[n_groups, out * bits / 32]`` -> uint8 ``[n_groups, out]``."""
    return unpack_stream(qzeros.t(), bits, out_features).t().contiguous()


# --- AWQ layout (``auto_awq`` and ``auto_round:auto_awq``; 4-bit only) --------------------------------
# qweight int32 [in, out / 8] packs along the OUTPUT dimension; inside a word the 8 output columns sit in
# the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble p (bits 4p..4p+3) holds column AWQ_ORDER[p] of the 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """uint4 values ``[rows, cols]`` -> int32 ``[rows, cols / 8]`` in the AWQ interleaved nibble order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)] & 0xF
    shifts = torch.arange(8, device=values.device) * 4
    words = (v << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: int32 ``[rows, cols / 8]`` -> uint8 ``[rows, cols]``."""
    rows, n = words.shape
    shifts = torch.arange(8, device=words.device) * 4
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [rows, n, nibble position]
    inverse = [AWQ_ORDER.index(j) for j in range(8)]  # column j sits at nibble position inverse[j]
    return nibbles[:, :, inverse].reshape(rows, n * 8).to(torch.uint8)


def pack_awq_qweight(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in]`` -> int32 ``[in, out / 8]``."""
    return pack_awq(q.t().contiguous())


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[in, out / 8]`` -> uint8 ``[out, in]``."""
    return unpack_awq(qweight).t().contiguous()


# --- compressed-tensors ``pack-quantized`` layout ------------------------------------------------------
# The GPTQ bit stream (value j at bit j * bits, words crossed where needed), along the LAST dimension:
# weight_packed int32 [out, in * bits / 32]; signed integers are stored with an offset of 2**(bits-1), which
# makes them exactly the unsigned integers of this project.  Zero points pack the same way along dim 0.


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint ``[rows, cols]`` -> int32 ``[rows, cols * bits / 32]`` (bit stream along each row)."""
    return pack_stream(values.t(), bits).t().contiguous()


def unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return unpack_stream(words.t(), bits, cols).t().contiguous()


# --- one layer's tensors, per layout (shared by every format that uses the layout) ----------------------


def gptq_layer_tensors(qw, zero_offset: int, g_idx: bool = False) -> dict[str, torch.Tensor]:
    """``qweight``/``qzeros``/``scales`` (and ``g_idx``) of a ``QuantizedWeight`` in the GPTQ layout;
    ``zero_offset`` 1 stores ``zp - 1`` (GPTQ v1), 0 stores ``zp``."""
    zeros = qw.zero.t().contiguous() - zero_offset  # [n_groups, out]
    zeros = zeros & ((1 << qw.bits) - 1)  # a -1 (asym zp 0 under zp-1) wraps as GPTQ v1 does
    out = {
        "qweight": pack_gptq_qweight(qw.qweight, qw.bits),
        "qzeros": pack_gptq_qzeros(zeros, qw.bits),
        "scales": qw.scale.t().contiguous().to(torch.float16),
    }
    if g_idx:
        from ..qmath import group_layout

        in_features = qw.qweight.shape[1]
        gs, _ = group_layout(in_features, qw.group_size)
        out["g_idx"] = (torch.arange(in_features) // gs).to(torch.int32)
    return out


def awq_whole_groups(group_size: int, in_features: int) -> bool:
    """Whether the AWQ layout can hold these groups: one group per row, or groups that divide the row."""
    return group_size <= 0 or group_size >= in_features or in_features % group_size == 0


def awq_layer_tensors(qw) -> dict[str, torch.Tensor]:
    """``qweight``/``qzeros``/``scales`` of a 4-bit ``QuantizedWeight`` in the AWQ layout (zp as is)."""
    if qw.bits != 4:
        raise ValueError(f"the AWQ layout holds 4-bit weights only, not {qw.bits}-bit")
    return {
        "qweight": pack_awq_qweight(qw.qweight),
        "qzeros": pack_awq(qw.zero.t().contiguous()),
        "scales": qw.scale.t().contiguous().to(torch.float16),
    }


# --- MLX layout (``mlx`` and ``auto_round:mlx``) -----------------------------------------------------------
# mlx-lm's QuantizedLinear (affine mode): ``weight`` uint32 [out, in * bits / 32] (the bit stream along each row,
# as ``pack_rows``), ``scales`` and ``biases`` [out, groups] in one float dtype, and w = scales * q + biases for
# the unsigned integers q.  This project's w = scale * (q - zero) is that with biases = -scale * zero: exact for
# symmetric weights (zero = 2**(bits-1), a power of two) and exact for zero points whenever the biases are stored
# in float32; float16 biases of an asymmetric layer round -scale * zero to float16 (half an ulp of the bias).
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)


def mlx_layer_tensors(qw, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``weight``/``scales``/``biases`` of a ``QuantizedWeight`` in MLX's layout, scales and biases in ``dtype``."""
    if qw.bits not in MLX_BITS:
        raise ValueError(f"MLX holds {', '.join(map(str, MLX_BITS))}-bit weights, not {qw.bits}-bit")
    scale = qw.scale.to(torch.float32)
    return {
        "weight": pack_rows(qw.qweight, qw.bits).view(torch.uint32),
        "scales": scale.to(dtype).contiguous(),
        "biases": (-scale * qw.zero.to(torch.float32)).to(dtype).contiguous(),
    }


def unpack_mlx_weight(weight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """MLX ``weight`` (uint32 or int32 ``[out, in * bits / 32]``) -> uint8 ``[out, in]``."""
    words = weight.view(torch.int32) if weight.dtype == torch.uint32 else weight
    return unpack_rows(words, bits, in_features)


# --------------------------------------------------------------------------------------------------------------
# minifloat layouts (MXFP4/MXFP8/MXINT4/NVFP4), shared by compressed-tensors' and the reference's auto_round
# checkpoints: 4-bit codes two to a byte, the even column in the low nibble; MX scales as E8M0 bytes (exp + 127)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] 4-bit codes -> [out, in/2] uint8, even columns in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: [out, in/2] uint8 -> [out, in] uint8 codes."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales -> uint8 E8M0 (log2(scale) + 127)."""
    return (torch.log2(scale.to(torch.float32)).round().to(torch.int32) + 127).to(torch.uint8)


def e8m0_scale(code: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 -> float32 2**(code - 127)."""
    return torch.ldexp(torch.ones(code.shape, device=code.device), code.to(torch.int32) - 127)


def mx_nv_tensors(qw, family: str) -> dict[str, torch.Tensor]:
    """``weight_packed`` (4-bit elements) or ``weight`` (float8_e4m3fn, MXFP8), ``weight_scale`` (E8M0 bytes for
    MX, float8_e4m3fn for NVFP4) and NVFP4's float32 ``weight_global_scale`` [1] of a ``FloatQuantizedWeight``."""
    out: dict[str, torch.Tensor] = {}
    if qw.bits == 4:
        out["weight_packed"] = pack_nibbles(qw.codes)
    else:
        out["weight"] = qw.codes.view(torch.float8_e4m3fn)
    if family == "nvfp":
        out["weight_scale"] = qw.scale.to(torch.float8_e4m3fn)
        out["weight_global_scale"] = qw.global_scale.to(torch.float32).reshape(1)
    else:
        out["weight_scale"] = e8m0_bytes(qw.scale)
    return out
