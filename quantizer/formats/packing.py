"""Bit packing of integer tensors into int32 words.  Pure tensor code.

GPTQ layout (``auto_gptq`` and ``auto_round:auto_gptq``): values form one continuous little-endian bit
stream along the packed dimension; value ``j`` starts at bit ``j * bits``.  For 2, 4 and 8 bits no value
crosses a word; for 3 bits this is GPTQ's cross-word layout (10 values, one split, 10, one split, 10 per
three words).  ``qweight`` packs along the input dimension, ``qzeros`` along the output dimension.
"""

from __future__ import annotations

import math

import torch

PACK_BITS = (2, 3, 4, 8)


def _check(bits: int, length: int, what: str) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"{bits}-bit values cannot be packed in the GPTQ layout; valid bits: {PACK_BITS}")
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
    spill = shift + bits > 32  # only 3-bit values straddle a word
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
