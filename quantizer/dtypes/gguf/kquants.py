"""The 256-element k-quant super-block types q2_k, q3_k, q4_k, q5_k and q6_k: each type's packing, quantizer and
dequantizer side by side (ggml's byte layout; sub-block scales and mins are integers against the super-block's
fp16 ``d``/``dmin``, "double quantization").

  q2_k  [scales 16: sc | m << 4][qs 64: 2-bit, 4 planes of 32][d fp16][dmin fp16] value = d*sc*q - dmin*m
  q3_k  [hmask 32][qs 64: 2-bit planes][scales 12: 16 x 6-bit][d fp16]           value = d*(sc-32)*(q-4)
  q4_k  [d fp16][dmin fp16][scales 12: 8 x (6-bit sc, 6-bit m)][qs 128]         value = d*sc*q - dmin*m
  q5_k  [d fp16][dmin fp16][scales 12][qh 32][qs 128]                            value = d*sc*q - dmin*m
  q6_k  [ql 128][qh 64][scales 16 int8][d fp16]                                  value = d*sc*(q-32)

Without importance the quantizers are llama.cpp's reference ones; with an importance matrix its
``quantize_row_*_impl`` searches (the super-block scales are themselves searched, ``make_qp_quants``).
"""

from __future__ import annotations

import torch

from .blocks import (
    _bytes_f16, _f16, _f16_col, _imatrix_weights, _nearest, _signed_absmax, _u8, _unpack_2bit_planes,
    make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, pack_2bit_planes, pack_kscales,
    pack_q3_scales, unpack_kscales, unpack_q3_scales,
)
from .types import GROUP_MAX_EPS, QK_K

def _k_asym(x, qw, nmax, sub, rmin, rdelta, nstep, use_mad, scale_bits):
    """Shared part of q2_k/q4_k/q5_k: sub-block (scale, min) search, then the super-block scales.
    Returns (d, dmin, sc ints [nb, nsub], m ints [nb, nsub], L [nb, 256])."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, sub)
    nsub = xs.shape[1]
    qmax = (1 << scale_bits) - 1
    if qw is None:
        if nmax == 3:  # q2_k reference: weights |x|
            w = xs.abs()
        else:
            av_x = torch.sqrt((xs * xs).mean(-1, keepdim=True))
            w = av_x + xs.abs()
        scales, mins, _ = make_qkx_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad)
        scales, mins = scales.squeeze(-1), mins.squeeze(-1)
        max_scale = scales.amax(-1, keepdim=True).clamp(min=0)
        max_min = mins.amax(-1, keepdim=True).clamp(min=0)
        inv_s = torch.where(max_scale > 0, qmax / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
        inv_m = torch.where(max_min > 0, qmax / torch.where(max_min > 0, max_min, 1.0), 0.0)
        ls = _nearest(inv_s * scales).clamp(max=qmax)
        lm = _nearest(inv_m * mins).clamp(max=qmax)
        d = max_scale / qmax
        dmin = max_min / qmax
    else:
        sigma2 = 2 * (x * x).sum(-1, keepdim=True).unsqueeze(-1) / QK_K
        w = _imatrix_weights(xs, qw.reshape(nb, -1, sub), sigma2)
        if nmax == 3:
            scales, mins, _ = make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        else:
            scales, mins, _ = make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        sw = w.sum(-1)
        d, ls = make_qp_quants(scales.squeeze(-1), qmax, sw)
        dmin, lm = make_qp_quants(mins.squeeze(-1), qmax, sw)
    d16, dmin16 = _f16(d), _f16(dmin)
    dl = d16 * ls  # [nb, nsub]
    dml = dmin16 * lm
    nz = dl != 0
    L = _nearest((xs + dml.unsqueeze(-1)) / torch.where(nz, dl, 1.0).unsqueeze(-1)).clamp(0, nmax)
    L = torch.where(nz.unsqueeze(-1), L, torch.zeros_like(L))
    return d, dmin, ls, lm, L.reshape(nb, -1), nsub


# -- q2_k --
def pack_q2_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: sc, m in 0..15; L in 0..3 (value = d*sc*L - dmin*m)."""
    scales = _u8(sc.to(torch.int32) | (m.to(torch.int32) << 4))
    return torch.cat([scales, pack_2bit_planes(L), _f16_col(d), _f16_col(dmin)], dim=-1)


def quantize_q2_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 3, 16, -0.5, 0.1, 15, True, 4)
    return pack_q2_k(d, dmin, ls, lm, L)


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    sc = b[:, :16].to(torch.int32)
    d, dmin = _bytes_f16(b[:, 80:82]), _bytes_f16(b[:, 82:84])
    dl = (d * (sc & 15).to(torch.float32)).unsqueeze(-1)
    ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = _unpack_2bit_planes(b[:, 16:80]).reshape(nb, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(nb, QK_K)


# -- q3_k --
def pack_q3_k(d: torch.Tensor, l: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: l = sc + 32 in 0..63; L = q + 4 in 0..7 (value = d*(l-32)*(L-4))."""
    nb = L.shape[0]
    L = L.to(torch.int32)
    # hmask: element j sets bit j // 32 of byte j % 32 when L >= 4
    high = (L >> 2).reshape(nb, 8, 32)
    hmask = _u8((high << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1))
    return torch.cat([hmask, pack_2bit_planes(L & 3), pack_q3_scales(l), _f16_col(d)], dim=-1)


def quantize_q3_k(x, qw=None, sigma2=None):
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        scales, _ = make_q3_quants(xs, 4)
        scales = scales.squeeze(-1)
        amax, max_scale = _signed_absmax(scales)
        nz = max_scale != 0
        iscale = -32 / torch.where(nz, max_scale, 1.0)
        l = (_nearest(iscale * scales).clamp(-32, 31) + 32)
        l = torch.where(nz, l, torch.zeros_like(l))
        d = torch.where(nz, 1 / iscale, 0.0)
    else:
        sigma2 = 2 * (x * x).sum(-1, keepdim=True).unsqueeze(-1) / QK_K
        w = _imatrix_weights(xs, qw.reshape(nb, 16, 16), sigma2)
        scales, _ = make_qx_quants(xs, 4, w)
        scales = scales.squeeze(-1)
        d, ls = make_qx_quants(scales, 32, w.sum(-1))
        l = torch.where(d != 0, ls, torch.zeros_like(ls))
    sc = l - 32
    dl = (_f16(d) * sc)  # [nb, 16]
    nz = dl != 0
    L = _nearest(xs / torch.where(nz, dl, 1.0).unsqueeze(-1)).clamp(-4, 3) + 4
    L = torch.where(nz.unsqueeze(-1), L, torch.zeros_like(L)).reshape(nb, QK_K)
    return pack_q3_k(d, l, L)


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    hmask = b[:, :32].to(torch.int32)
    high = ((hmask.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, QK_K)
    q = _unpack_2bit_planes(b[:, 32:96]) - ((high ^ 1) << 2)
    d = _bytes_f16(b[:, 108:110])
    dl = (d * unpack_q3_scales(b[:, 96:108]).to(torch.float32)).unsqueeze(-1)
    return (dl * q.reshape(nb, 16, 16).to(torch.float32)).reshape(nb, QK_K)


def _k_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k/q5_k: the sub-block scales d*sc and mins dmin*m, ``[nb, 8, 1]`` float32."""
    d, dmin = _bytes_f16(b[:, :2]), _bytes_f16(b[:, 2:4])
    sc, m = unpack_kscales(b[:, 4:16])
    return (d * sc.to(torch.float32)).unsqueeze(-1), (dmin * m.to(torch.float32)).unsqueeze(-1)


# -- q4_k --
def pack_q4_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks: sc, m in 0..63; L in 0..15 (value = d*sc*L - dmin*m)."""
    L = L.to(torch.int32).reshape(-1, 4, 2, 32)
    qs = _u8(L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_col(d), _f16_col(dmin), pack_kscales(sc, m), qs], dim=-1)


def quantize_q4_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 15, 32, -1.0, 0.1, 20, False, 6)
    return pack_q4_k(d, dmin, ls, lm, L)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    dl, dm = _k_scales_mins(b)
    qs = b[:, 16:].to(torch.int32).reshape(nb, 4, 1, 32)
    q = ((qs >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 8, 32)
    return (dl * q.to(torch.float32) - dm).reshape(nb, QK_K)


# -- q5_k --
def pack_q5_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks: sc, m in 0..63; L in 0..31 (value = d*sc*L - dmin*m)."""
    L = L.to(torch.int32)
    hbits = (L >> 4).reshape(-1, 8, 32)  # sub-block i -> bit i of qh[l]
    qh = _u8((hbits << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1))
    lo = (L & 15).reshape(-1, 4, 2, 32)
    qs = _u8(lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_col(d), _f16_col(dmin), pack_kscales(sc, m), qh, qs], dim=-1)


def quantize_q5_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 31, 32, -0.5, 0.1, 15, False, 6)
    return pack_q5_k(d, dmin, ls, lm, L)


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    dl, dm = _k_scales_mins(b)
    qh = b[:, 16:48].to(torch.int32)
    qs = b[:, 48:].to(torch.int32).reshape(nb, 4, 1, 32)
    lo = ((qs >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 8, 32)
    hi = (qh.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1
    q = lo | (hi << 4)
    return (dl * q.to(torch.float32) - dm).reshape(nb, QK_K)


# -- q6_k --
def pack_q6_k(d: torch.Tensor, sc: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: sc in -128..127; L = q + 32 in 0..63 (value = d*sc*(L-32))."""
    nb = L.shape[0]
    L = L.to(torch.int32).reshape(nb, 2, 4, 32)
    ql = torch.cat([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], -1)
    ql = _u8(ql.reshape(nb, 2, 2, 32)).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    qh = _u8(qh).reshape(nb, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_col(d)], dim=-1)

def quantize_q6_k(x, qw=None, sigma2=None):
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        w = None
    else:  # llama.cpp's q6_k uses the importance alone as weights
        w = qw.reshape(nb, 16, 16)
    scales, _ = make_qx_quants(xs, 32, w)
    scales = scales.squeeze(-1)
    amax, max_scale = _signed_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, 0.0, 1 / iscale)
    sc = torch.where(zero, 0.0, _nearest(iscale * scales).clamp(max=127))
    dl = _f16(d) * sc
    nz = dl != 0
    L = _nearest(xs / torch.where(nz, dl, 1.0).unsqueeze(-1)).clamp(-32, 31) + 32
    L = torch.where(nz.unsqueeze(-1), L, torch.zeros_like(L)).reshape(nb, QK_K)
    return pack_q6_k(d, sc, L)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    ql = b[:, :128].to(torch.int32).reshape(nb, 2, 1, 64)
    ql = ((ql >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 2, 4, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(nb, 2, 1, 32)
    qh = ((qh >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3)
    q = ((ql | (qh << 4)) - 32).reshape(nb, 16, 16).to(torch.float32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _bytes_f16(b[:, 208:210])
    return ((d * sc).unsqueeze(-1) * q).reshape(nb, QK_K)


CODECS = {
    "q2_k": (quantize_q2_k, dequantize_q2_k),
    "q3_k": (quantize_q3_k, dequantize_q3_k),
    "q4_k": (quantize_q4_k, dequantize_q4_k),
    "q5_k": (quantize_q5_k, dequantize_q5_k),
    "q6_k": (quantize_q6_k, dequantize_q6_k),
}
