"""The 32-element block types q4_0, q4_1, q5_0, q5_1 and q8_0: each type's packing, quantizer and dequantizer
side by side (ggml's byte layout, little endian; fp16 = IEEE half).

  q4_0  [d fp16][qs 16: q[j] | q[j+16] << 4]                                    value = d * (q - 8)
  q4_1  [d fp16][m fp16][qs 16]                                                  value = d * q + m
  q5_0  [d fp16][qh u32: bit j = q[j] >> 4][qs 16: low nibbles as q4_0]          value = d * (q - 16)
  q5_1  [d fp16][m fp16][qh u32][qs 16]                                          value = d * q + m
  q8_0  [d fp16][qs 32 int8]                                                     value = d * q

Quantizers take ``x [nb, 32]`` float32, ``qw`` (per-element importance) ``[nb, 32]`` or None and ``sigma2``
``[nb, 1]`` (the row's mean square); without importance they are llama.cpp's ``quantize_row_*_ref`` (bytes equal
to the ``gguf`` package's), with it its ``quantize_row_*_impl`` least-squares search.  Dequantizers take the
``[nb, type_size]`` uint8 blocks and give float32 ``[nb, 32]`` with ggml's own float operations.
"""

from __future__ import annotations

import torch

from .blocks import (
    _bytes_f16, _f16_col, _imatrix_weights, _nibbles, _q5_high, _roundf, _signed_absmax, make_qkx_quants,
    make_qx_quants, pack_nibbles, pack_q5_high,
)

def _q_0(x: torch.Tensor, qw: torch.Tensor | None, sigma2: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 32-blocks (q4_0: nmax 8, q5_0: nmax 16): (d [nb,1] float32, q [nb,32] in [0, 2*nmax))."""
    if qw is None:
        _, mx = _signed_absmax(x)
        d = mx / -nmax
        idv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
        q = torch.trunc(x * idv + (nmax + 0.5)).clamp(0, 2 * nmax - 1)
        return d, q
    d, q = make_qx_quants(x, nmax, _imatrix_weights(x, qw, sigma2))
    return d, q


def _q_1(x: torch.Tensor, qw: torch.Tensor | None, sigma2: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 32-blocks (q4_1: 15, q5_1: 31): (d, m, q)."""
    if qw is None:
        mx = x.amax(-1, keepdim=True)
        mn = x.amin(-1, keepdim=True)
        d = (mx - mn) / nmax
        idv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
        q = torch.trunc((x - mn) * idv + 0.5).clamp(0, nmax)
        return d, mn, q
    scale, the_min, q = make_qkx_quants(x, _imatrix_weights(x, qw, sigma2), nmax, -0.9, 0.05, 36, False)
    return scale, -the_min, q


# -- q4_0 --
def pack_q4_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..15 (value = d * (q - 8))."""
    return torch.cat([_f16_col(d), pack_nibbles(q)], dim=-1)


def quantize_q4_0(x, qw=None, sigma2=None):
    d, q = _q_0(x, qw, sigma2, 8)
    return pack_q4_0(d, q)


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _bytes_f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8).to(torch.float32)


# -- q4_1 --
def pack_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..15 (value = d * q + m)."""
    return torch.cat([_f16_col(d), _f16_col(m), pack_nibbles(q)], dim=-1)


def quantize_q4_1(x, qw=None, sigma2=None):
    d, m, q = _q_1(x, qw, sigma2, 15)
    return pack_q4_1(d, m, q)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _bytes_f16(b[:, :2]) * _nibbles(b[:, 4:]).to(torch.float32) + _bytes_f16(b[:, 2:4])


# -- q5_0 --
def pack_q5_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..31 (value = d * (q - 16))."""
    q = q.to(torch.int32)
    return torch.cat([_f16_col(d), pack_q5_high(q), pack_nibbles(q & 15)], dim=-1)


def quantize_q5_0(x, qw=None, sigma2=None):
    d, q = _q_0(x, qw, sigma2, 16)
    return pack_q5_0(d, q)


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
    return _bytes_f16(b[:, :2]) * (q - 16).to(torch.float32)


# -- q5_1 --
def pack_q5_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..31 (value = d * q + m)."""
    q = q.to(torch.int32)
    return torch.cat([_f16_col(d), _f16_col(m), pack_q5_high(q), pack_nibbles(q & 15)], dim=-1)


def quantize_q5_1(x, qw=None, sigma2=None):
    d, m, q = _q_1(x, qw, sigma2, 31)
    return pack_q5_1(d, m, q)


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return _bytes_f16(b[:, :2]) * q.to(torch.float32) + _bytes_f16(b[:, 2:4])


# -- q8_0 --
def pack_q8_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in -128..127 (value = d * q)."""
    return torch.cat([_f16_col(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


def quantize_q8_0(x, qw=None, sigma2=None):
    """q8_0 has no importance-weighted variant in llama.cpp: absmax / 127, round half away from zero."""
    d = x.abs().amax(-1, keepdim=True) / 127
    idv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    return pack_q8_0(d, _roundf(x * idv))


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _bytes_f16(b[:, :2])


CODECS = {
    "q4_0": (quantize_q4_0, dequantize_q4_0),
    "q4_1": (quantize_q4_1, dequantize_q4_1),
    "q5_0": (quantize_q5_0, dequantize_q5_0),
    "q5_1": (quantize_q5_1, dequantize_q5_1),
    "q8_0": (quantize_q8_0, dequantize_q8_0),
}
