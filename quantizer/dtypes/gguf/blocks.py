"""Numerics shared by the ggml block codecs: llama.cpp's rounding, fp16 byte helpers, the (importance-weighted)
scale searches and the bit-packing primitives.  Every function works on ``[n_blocks, ...]`` float32 rows."""

from __future__ import annotations

import numpy as np
import torch

from .types import GROUP_MAX_EPS, QK_K

# ---------------------------------------------------------------------------------------------------------
# small helpers


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even (float32 magic-number rounding)."""
    return torch.round(x)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero, computed exactly as the gguf package does."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] uint8 (fp16, little endian)."""
    return x.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|max|, the signed value of largest magnitude; first occurrence), both ``[..., 1]``."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = torch.gather(x, -1, idx)
    return mx.abs(), mx


def _f32(*terms: float) -> float:
    """``a + b*c ...`` evaluated as C does in float32: ``_f32(a, (b, c))`` = f32(a) + f32(f32(b) * f32(c))."""
    acc = np.float32(0)
    for t in terms:
        acc = np.float32(acc + (np.float32(t[0]) * np.float32(t[1]) if isinstance(t, tuple) else np.float32(t)))
    return float(acc)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# scale searches (vectorized over blocks; each row of ``x`` is one (sub-)block)


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None, rmse_type: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search: (scale ``[..., 1]``, integers ``L`` in ``[0, 2*nmax)`` = l + nmax).

    The largest-magnitude value maps to ``-nmax``; candidates ``-(nmax + 0.1*is)/max`` for ``is`` in -9..9 get
    a weighted least-squares scale and the best is kept.  ``weights`` None: ``x**2`` (rmse_type 1)."""
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = weights if weights is not None else x * x

    def trial(iscale):
        l = _nearest(iscale * x).clamp(-nmax, nmax - 1)
        return l, (w * x * l).sum(-1, keepdim=True), (w * l * l).sum(-1, keepdim=True)

    iscale = -nmax / mx
    if rmse_type == 0:
        l = _nearest(iscale * x).clamp(-nmax, nmax - 1)
        return torch.where(zero, 0.0, 1 / iscale), torch.where(zero, 0.0, l + nmax)
    best_l, sumlx, suml2 = trial(iscale)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-_f32(nmax, (0.1, step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_l = torch.where(better, l, best_l)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, best_l + nmax)


def make_qkx_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, min) search: (scale ``[..., 1]``, ``the_min`` = -min >= 0 ``[..., 1]``, L in [0, nmax]).

    Start from the min/max range (min clamped to <= 0), then try ranges ``(rmin + rdelta*is + nmax)`` for
    ``is`` in 0..nstep, each with a weighted least-squares (scale, min) refit; keep the smallest weighted
    squared (or absolute, ``use_mad``) error."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)

    def err(scale, m, l):
        diff = scale * l + m - x
        return (weights * (diff.abs() if use_mad else diff * diff)).sum(-1, keepdim=True)

    iscale = nmax / rng
    scale = 1 / iscale
    best_l = _nearest(iscale * (x - mn)).clamp(0, nmax)
    best_mad = err(scale, mn, best_l)
    for step in range(nstep + 1):
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)  # min moves with the best candidate, as in C
        iscale = _f32(rmin, (rdelta, step), nmax) / rng
        l = _nearest(iscale * (x - mn)).clamp(0, nmax)
        sum_l = (weights * l).sum(-1, keepdim=True)
        sum_l2 = (weights * l * l).sum(-1, keepdim=True)
        sum_xl = (weights * l * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        mad = err(this_scale, this_min, l)
        better = ok & (mad < best_mad)
        best_l = torch.where(better, l, best_l)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat, torch.zeros_like(best_l), best_l)
    return scale, -mn, best_l


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values (sub-block scales or mins) -> (super scale ``[..., 1]``, L in [0, nmax]).

    llama.cpp's super-block scale quantizer: a grid of 8 ranges around ``nmax/max``, then up to 5 rounds of
    per-element coordinate descent on the weighted least-squares fit."""
    mx = x.amax(-1, keepdim=True).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mx
    l = _nearest(iscale * x)
    best_mse = (weights * (x - l / iscale) ** 2).sum(-1, keepdim=True)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = _f32((0.1, step), nmax) / mx
        li = _nearest(isc * x).clamp(max=nmax)
        mse = (weights * (x - (1 / isc) * li) ** 2).sum(-1, keepdim=True)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, isc, iscale)
    L = _nearest(iscale * x).clamp(max=nmax)
    sumlx = (weights * x * L).sum(-1, keepdim=True)
    suml2 = (weights * L * L).sum(-1, keepdim=True)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            w, xi, li = weights[..., i : i + 1], x[..., i : i + 1], L[..., i : i + 1]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = _nearest(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(max=nmax)
            slx2 = slx + w * xi * new_l
            sl22 = sl2 + w * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i : i + 1] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not changed.any():
            break
    scale = sumlx / torch.where(suml2 > 0, suml2, 1.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's reference 3-bit sub-block search (do_rmse): coordinate descent weighted by x**2.
    Returns (scale ``[..., 1]``, L in [0, 2*nmax))."""
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = -nmax / mx
    L = _nearest(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * L).sum(-1, keepdim=True)
    suml2 = (w * L * L).sum(-1, keepdim=True)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i : i + 1], x[..., i : i + 1], L[..., i : i + 1]
            slx = sumlx - wi * xi * li
            ok = slx > 0
            sl2 = suml2 - wi * li * li
            new_l = _nearest(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i : i + 1] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not changed.any():
            break
    scale = sumlx / torch.where(suml2 > 0, suml2, 1.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's element weights with an importance matrix: ``qw * sqrt(sigma2 + x**2)``."""
    return qw * torch.sqrt(sigma2 + x * x)


# ---------------------------------------------------------------------------------------------------------
# bit packing (inputs: integer-valued tensors; outputs: uint8 blocks)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] values 0..15 -> [nb, 16]: byte j = q[j] | q[j+16] << 4."""
    q = q.to(torch.int32)
    return _u8(q[:, :16] | (q[:, 16:32] << 4))


def pack_q5_high(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] values 0..31 -> [nb, 4]: little-endian uint32 whose bit j is q[j] >> 4."""
    bits = (q.to(torch.int64) >> 4) & 1
    word = (bits << torch.arange(32, dtype=torch.int64)).sum(-1, keepdim=True)
    return _u8((word >> torch.tensor([0, 8, 16, 24])) & 0xFF)


def pack_2bit_planes(L: torch.Tensor) -> torch.Tensor:
    """[nb, 256] values 0..3 -> [nb, 64]: per 128 half, byte l = L[l] | L[l+32]<<2 | L[l+64]<<4 | L[l+96]<<6."""
    L = L.to(torch.int32).reshape(-1, 2, 4, 32)
    return _u8(L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def pack_kscales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins -> 12 bytes (q4_k/q5_k):
    bytes 0-3: sc[j] | (sc[j+4] >> 4) << 6; bytes 4-7: m[j] | (m[j+4] >> 4) << 6;
    bytes 8-11: (sc[j+4] & 15) | (m[j+4] & 15) << 4."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return _u8(torch.cat([lo, mid, hi], dim=-1))


def unpack_kscales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit values (scale + 32) -> 12 bytes: byte j<8 low nibbles of l[j] | l[j+8] << 4;
    byte 8 + j%4 holds l[j] >> 4 at bit 2*(j//4)."""
    l = l.to(torch.int32)
    low = (l[:, :8] & 15) | ((l[:, 8:] & 15) << 4)
    hi4 = l >> 4  # [nb, 16], 2 bits each
    hi = hi4[:, 0:4] | (hi4[:, 4:8] << 2) | (hi4[:, 8:12] << 4) | (hi4[:, 12:16] << 6)
    return _u8(torch.cat([low, hi], dim=-1))


def unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=-1)
    hi = torch.cat([(b[:, 8:12] >> (2 * k)) & 3 for k in range(4)], dim=-1)
    return (low | (hi << 4)) - 32


def _f16_col(d: torch.Tensor) -> torch.Tensor:
    return _f16_bytes(d.reshape(-1, 1))


# one packer per block type: (scales as float / integer-valued tensors, weight integers) -> uint8 [nb, type_size].
# d/dmin/m: [nb] or [nb, 1] floats (stored as fp16); sc/m (k-quants): [nb, n_sub] integers; q/L: [nb, block]
# stored (unsigned) integers, except q8_0's signed int8 values.


# ---------------------------------------------------------------------------------------------------------
# dequantizers: uint8 [nb, type_size] -> float32 [nb, block_size] (same float operations as ggml's reference)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] -> [nb, 32]: low nibbles first, then high nibbles."""
    qs = qs.to(torch.int32)
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    qh = qh.to(torch.int64)
    word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    return ((word.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32)


def _unpack_2bit_planes(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    return ((qs >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3).reshape(-1, QK_K)

