"""GGUF (ggml) block quantization: the type table, llama.cpp-style quantizers, bit packing, dequantization,
and llama.cpp's per-tensor type rules for the ``_S/_M/_L`` mixtures.  Pure tensor code: no model code.

Every quantizer works on ``[n_blocks, block_size]`` float32 rows and returns ``[n_blocks, type_size]`` uint8
blocks in ggml's byte layout (little endian).  Two modes, as in llama.cpp:

- reference (``importance`` None): ``quantize_row_*_ref``.  For q4_0/q4_1/q5_0/q5_1/q8_0 the bytes equal the
  ``gguf`` package's ``gguf.quants.quantize`` (tested bit for bit);
- importance-weighted (an importance matrix = per-input-channel mean of squared activations, as llama.cpp's
  imatrix): ``quantize_row_*_impl``: each (sub-)block scale is searched on a grid with least-squares refits
  (``make_qx_quants``/``make_qkx2_quants``/``make_qp_quants``), weighting the error by
  ``imatrix * sqrt(sigma2 + x**2)``, and the k-quant super-block scales are themselves quantized that way.

Block layouts (bytes, in order; fp16 = IEEE half):
  q4_0  [d fp16][qs 16: q[j] | q[j+16] << 4]                                    value = d * (q - 8)
  q4_1  [d fp16][m fp16][qs 16]                                                  value = d * q + m
  q5_0  [d fp16][qh u32: bit j = q[j] >> 4][qs 16: low nibbles as q4_0]          value = d * (q - 16)
  q5_1  [d fp16][m fp16][qh u32][qs 16]                                          value = d * q + m
  q8_0  [d fp16][qs 32 int8]                                                     value = d * q
  q2_k  [scales 16: sc | m << 4][qs 64: 2-bit, 4 planes of 32][d fp16][dmin fp16] value = d*sc*q - dmin*m
  q3_k  [hmask 32][qs 64: 2-bit planes][scales 12: 16 x 6-bit][d fp16]           value = d*(sc-32)*(q-4)
  q4_k  [d fp16][dmin fp16][scales 12: 8 x (6-bit sc, 6-bit m)][qs 128]         value = d*sc*q - dmin*m
  q5_k  [d fp16][dmin fp16][scales 12][qh 32][qs 128]                            value = d*sc*q - dmin*m
  q6_k  [ql 128][qh 64][scales 16 int8][d fp16]                                  value = d*sc*(q-32)
  iq4_nl [d fp16][qs 16]                                                         value = d * KVALUES_IQ4NL[q]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF files, block geometry and the integer scheme it stands for."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    bits: int  # weight bits (16/32 for float types)
    group_size: int  # elements sharing one (sub-block) scale
    sym: bool

    @property
    def is_float(self) -> bool:
        return self.bits >= 16


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("f32", 0, 1, 4, 32, -1, True),
        GGMLType("f16", 1, 1, 2, 16, -1, True),
        GGMLType("bf16", 30, 1, 2, 16, -1, True),
        GGMLType("q4_0", 2, 32, 18, 4, 32, True),
        GGMLType("q4_1", 3, 32, 20, 4, 32, False),
        GGMLType("q5_0", 6, 32, 22, 5, 32, True),
        GGMLType("q5_1", 7, 32, 24, 5, 32, False),
        GGMLType("q8_0", 8, 32, 34, 8, 32, True),
        GGMLType("q2_k", 10, QK_K, 84, 2, 16, False),
        GGMLType("q3_k", 11, QK_K, 110, 3, 16, True),
        GGMLType("q4_k", 12, QK_K, 144, 4, 32, False),
        GGMLType("q5_k", 13, QK_K, 176, 5, 32, False),
        GGMLType("q6_k", 14, QK_K, 210, 6, 16, True),
        GGMLType("iq4_nl", 20, 32, 18, 4, 32, True),
    )
}
QUANT_TYPES = tuple(n for n, t in GGML_TYPES.items() if not t.is_float)


@dataclass(frozen=True)
class GGUFFileType:
    """A llama.cpp file type (``general.file_type``): the default tensor type plus per-tensor rules."""

    name: str
    ftype_id: int  # llama_ftype
    default_type: str


GGUF_FILE_TYPES: dict[str, GGUFFileType] = {
    f.name: f
    for f in (
        GGUFFileType("f16", 1, "f16"),
        GGUFFileType("bf16", 32, "bf16"),
        GGUFFileType("q4_0", 2, "q4_0"),
        GGUFFileType("q4_1", 3, "q4_1"),
        GGUFFileType("q5_0", 8, "q5_0"),
        GGUFFileType("q5_1", 9, "q5_1"),
        GGUFFileType("q8_0", 7, "q8_0"),
        GGUFFileType("q2_k_s", 21, "q2_k"),
        GGUFFileType("q3_k_s", 11, "q3_k"),
        GGUFFileType("q3_k_m", 12, "q3_k"),
        GGUFFileType("q3_k_l", 13, "q3_k"),
        GGUFFileType("q4_k_s", 14, "q4_k"),
        GGUFFileType("q4_k_m", 15, "q4_k"),
        GGUFFileType("q5_k_s", 16, "q5_k"),
        GGUFFileType("q5_k_m", 17, "q5_k"),
        GGUFFileType("q6_k", 18, "q6_k"),
    )
}


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's per-tensor type choice (llama_tensor_get_type), for the file types above.
# category: "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd",
# "output" (the lm_head); other tensors are not quantized.


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp: the first and last eighth of the layers, and every third layer between, get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# k-quant types whose 256-wide super-block does not fit a row fall back as llama.cpp does
# (llama.cpp's tensor_type_fallback: q2_k/q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0)
_INCOMPATIBLE_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fit_row(qtype: str, row_len: int) -> str:
    """The type llama.cpp uses when ``qtype``'s block does not divide the row (then f16 as the last resort)."""
    if row_len % GGML_TYPES[qtype].block_size == 0:
        return qtype
    new = _INCOMPATIBLE_FALLBACK.get(qtype, "f16")
    return new if row_len % GGML_TYPES[new].block_size == 0 else "f16"


def tensor_type(
    ftype: str,
    category: str,
    row_len: int,
    i_layer: int = 0,
    n_layers: int = 1,
    n_gqa: int = 1,
    tied_output: bool = False,
) -> str:
    """The ggml type llama.cpp's ``llama_tensor_get_type`` picks for one tensor of a ``ftype`` file.

    ``i_layer``/``n_layers`` count the layers holding this category (attn_v and ffn_down use them);
    ``n_gqa`` = attention heads / kv heads; ``tied_output``: the model has no separate lm_head, so the
    token embedding also serves as the output projection and follows the output rules.
    """
    ft = GGUF_FILE_TYPES[ftype]
    new = ft.default_type
    if GGML_TYPES[new].is_float:
        return new
    if category == "output" or (category == "token_embd" and tied_output):
        if row_len % GGML_TYPES[new].block_size != 0:
            new = "q8_0"
        elif new != "q8_0":
            new = "q6_k"
    elif category == "attn_v":
        if ftype == "q2_k_s" and n_gqa >= 4:
            new = "q4_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i_layer < 2 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layers):
            new = "q6_k"
        elif ftype == "q4_k_s" and i_layer < 4:
            new = "q5_k"
    elif category == "ffn_down":
        if ftype == "q2_k_s":
            if i_layer < n_layers // 8:
                new = "q4_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i_layer < n_layers // 16 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layers):
            new = "q6_k"
        elif ftype == "q4_k_s" and i_layer < n_layers // 8:
            new = "q5_k"
    elif category == "attn_output":
        if ftype == "q3_k_m":
            new = "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
    return fit_row(new, row_len)


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


def pack_q4_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..15 (value = d * (q - 8))."""
    return torch.cat([_f16_col(d), pack_nibbles(q)], dim=-1)


def pack_q5_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..31 (value = d * (q - 16))."""
    q = q.to(torch.int32)
    return torch.cat([_f16_col(d), pack_q5_high(q), pack_nibbles(q & 15)], dim=-1)


def pack_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..15 (value = d * q + m)."""
    return torch.cat([_f16_col(d), _f16_col(m), pack_nibbles(q)], dim=-1)


def pack_q5_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in 0..31 (value = d * q + m)."""
    q = q.to(torch.int32)
    return torch.cat([_f16_col(d), _f16_col(m), pack_q5_high(q), pack_nibbles(q & 15)], dim=-1)


def pack_q8_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in -128..127 (value = d * q)."""
    return torch.cat([_f16_col(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


def pack_q2_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: sc, m in 0..15; L in 0..3 (value = d*sc*L - dmin*m)."""
    scales = _u8(sc.to(torch.int32) | (m.to(torch.int32) << 4))
    return torch.cat([scales, pack_2bit_planes(L), _f16_col(d), _f16_col(dmin)], dim=-1)


def pack_q3_k(d: torch.Tensor, l: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: l = sc + 32 in 0..63; L = q + 4 in 0..7 (value = d*(l-32)*(L-4))."""
    nb = L.shape[0]
    L = L.to(torch.int32)
    # hmask: element j sets bit j // 32 of byte j % 32 when L >= 4
    high = (L >> 2).reshape(nb, 8, 32)
    hmask = _u8((high << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1))
    return torch.cat([hmask, pack_2bit_planes(L & 3), pack_q3_scales(l), _f16_col(d)], dim=-1)


def pack_q4_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks: sc, m in 0..63; L in 0..15 (value = d*sc*L - dmin*m)."""
    L = L.to(torch.int32).reshape(-1, 4, 2, 32)
    qs = _u8(L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_col(d), _f16_col(dmin), pack_kscales(sc, m), qs], dim=-1)


def pack_q5_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks: sc, m in 0..63; L in 0..31 (value = d*sc*L - dmin*m)."""
    L = L.to(torch.int32)
    hbits = (L >> 4).reshape(-1, 8, 32)  # sub-block i -> bit i of qh[l]
    qh = _u8((hbits << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1))
    lo = (L & 15).reshape(-1, 4, 2, 32)
    qs = _u8(lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_col(d), _f16_col(dmin), pack_kscales(sc, m), qh, qs], dim=-1)


def pack_q6_k(d: torch.Tensor, sc: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks: sc in -128..127; L = q + 32 in 0..63 (value = d*sc*(L-32))."""
    nb = L.shape[0]
    L = L.to(torch.int32).reshape(nb, 2, 4, 32)
    ql = torch.cat([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], -1)
    ql = _u8(ql.reshape(nb, 2, 2, 32)).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    qh = _u8(qh).reshape(nb, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_col(d)], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# quantizers: x [nb, block_size] float32, qw (importance per element) [nb, block_size] or None,
# sigma2 [nb, 1] (mean square of the whole row, for the 32-blocks types) -> uint8 [nb, type_size]


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


def quantize_q4_0(x, qw=None, sigma2=None):
    d, q = _q_0(x, qw, sigma2, 8)
    return pack_q4_0(d, q)


def quantize_q5_0(x, qw=None, sigma2=None):
    d, q = _q_0(x, qw, sigma2, 16)
    return pack_q5_0(d, q)


def quantize_q4_1(x, qw=None, sigma2=None):
    d, m, q = _q_1(x, qw, sigma2, 15)
    return pack_q4_1(d, m, q)


def quantize_q5_1(x, qw=None, sigma2=None):
    d, m, q = _q_1(x, qw, sigma2, 31)
    return pack_q5_1(d, m, q)


def quantize_q8_0(x, qw=None, sigma2=None):
    """q8_0 has no importance-weighted variant in llama.cpp: absmax / 127, round half away from zero."""
    d = x.abs().amax(-1, keepdim=True) / 127
    idv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    return pack_q8_0(d, _roundf(x * idv))


def quantize_iq4_nl(x, qw=None, sigma2=None, ntry: int = 7):
    """Non-linear 4-bit, a 16-value table (llama.cpp falls back to it from the i-quants; kept for layer_config)."""
    values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
    sig = 2 * (x * x).sum(-1, keepdim=True) / x.shape[-1]
    w = _imatrix_weights(x, qw, sig) if qw is not None else x * x
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    mids = ((values[1:] + values[:-1]) / 2).tolist()  # half-integers, exact

    def best_index(v):
        """Index of the nearest table value; a tie goes to the larger one (llama.cpp's best_index_int8)."""
        idx = torch.zeros(v.shape, dtype=torch.int64)
        for m in mids:
            idx += v >= m
        return idx

    def fit(idv):
        l = best_index(idv * x)
        q = values[l]
        return l, (w * q * x).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)

    d = -mx / values[0]
    _, sumqx, sumq2 = fit(1 / d)
    d = sumqx / torch.where(sumq2 > 0, sumq2, 1.0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        _, sumqx, sumq2 = fit((itry + values[0]) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    idv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    l = best_index(idv * x)
    return torch.cat([_f16_bytes(d), pack_nibbles(l)], dim=-1)


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


def quantize_q2_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 3, 16, -0.5, 0.1, 15, True, 4)
    return pack_q2_k(d, dmin, ls, lm, L)


def quantize_q4_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 15, 32, -1.0, 0.1, 20, False, 6)
    return pack_q4_k(d, dmin, ls, lm, L)


def quantize_q5_k(x, qw=None, sigma2=None):
    d, dmin, ls, lm, L, _ = _k_asym(x, qw, 31, 32, -0.5, 0.1, 15, False, 6)
    return pack_q5_k(d, dmin, ls, lm, L)


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


QUANTIZERS = {
    "q4_0": quantize_q4_0,
    "q4_1": quantize_q4_1,
    "q5_0": quantize_q5_0,
    "q5_1": quantize_q5_1,
    "q8_0": quantize_q8_0,
    "q2_k": quantize_q2_k,
    "q3_k": quantize_q3_k,
    "q4_k": quantize_q4_k,
    "q5_k": quantize_q5_k,
    "q6_k": quantize_q6_k,
    "iq4_nl": quantize_iq4_nl,
}


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


def dequantize_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    nb = b.shape[0]
    if qtype == "q4_0":
        return _bytes_f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8).to(torch.float32)
    if qtype == "q4_1":
        return _bytes_f16(b[:, :2]) * _nibbles(b[:, 4:]).to(torch.float32) + _bytes_f16(b[:, 2:4])
    if qtype == "q5_0":
        q = _nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
        return _bytes_f16(b[:, :2]) * (q - 16).to(torch.float32)
    if qtype == "q5_1":
        q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
        return _bytes_f16(b[:, :2]) * q.to(torch.float32) + _bytes_f16(b[:, 2:4])
    if qtype == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _bytes_f16(b[:, :2])
    if qtype == "iq4_nl":
        values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
        return _bytes_f16(b[:, :2]) * values[_nibbles(b[:, 2:]).long()]
    if qtype == "q2_k":
        sc = b[:, :16].to(torch.int32)
        d, dmin = _bytes_f16(b[:, 80:82]), _bytes_f16(b[:, 82:84])
        dl = (d * (sc & 15).to(torch.float32)).unsqueeze(-1)
        ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
        q = _unpack_2bit_planes(b[:, 16:80]).reshape(nb, 16, 16).to(torch.float32)
        return (dl * q - ml).reshape(nb, QK_K)
    if qtype == "q3_k":
        hmask = b[:, :32].to(torch.int32)
        high = ((hmask.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, QK_K)
        q = _unpack_2bit_planes(b[:, 32:96]) - ((high ^ 1) << 2)
        d = _bytes_f16(b[:, 108:110])
        dl = (d * unpack_q3_scales(b[:, 96:108]).to(torch.float32)).unsqueeze(-1)
        return (dl * q.reshape(nb, 16, 16).to(torch.float32)).reshape(nb, QK_K)
    if qtype in ("q4_k", "q5_k"):
        d, dmin = _bytes_f16(b[:, :2]), _bytes_f16(b[:, 2:4])
        sc, m = unpack_kscales(b[:, 4:16])
        dl = (d * sc.to(torch.float32)).unsqueeze(-1)
        dm = (dmin * m.to(torch.float32)).unsqueeze(-1)
        if qtype == "q4_k":
            qs = b[:, 16:].to(torch.int32).reshape(nb, 4, 1, 32)
            q = ((qs >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 8, 32)
        else:
            qh = b[:, 16:48].to(torch.int32)
            qs = b[:, 48:].to(torch.int32).reshape(nb, 4, 1, 32)
            lo = ((qs >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 8, 32)
            hi = (qh.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1
            q = lo | (hi << 4)
        return (dl * q.to(torch.float32) - dm).reshape(nb, QK_K)
    if qtype == "q6_k":
        ql = b[:, :128].to(torch.int32).reshape(nb, 2, 1, 64)
        ql = ((ql >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(nb, 2, 4, 32)
        qh = b[:, 128:192].to(torch.int32).reshape(nb, 2, 1, 32)
        qh = ((qh >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3)
        q = ((ql | (qh << 4)) - 32).reshape(nb, 16, 16).to(torch.float32)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = _bytes_f16(b[:, 208:210])
        return ((d * sc).unsqueeze(-1) * q).reshape(nb, QK_K)
    raise ValueError(f"no dequantizer for ggml type {qtype!r}")


# ---------------------------------------------------------------------------------------------------------
# whole tensors

_CHUNK_ELEMS = 1 << 21


def quantize_tensor(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A float ``[rows, cols]`` weight -> uint8 ``[rows, cols / block_size * type_size]`` in ggml layout.

    ``importance`` (``[cols]``, >= 0; e.g. mean squared activations per input channel) switches from the
    reference quantizer to the importance-weighted search; float types ignore it."""
    t = GGML_TYPES[qtype]
    w = w.detach().to("cpu", torch.float32).contiguous()
    rows, cols = w.shape
    if t.is_float:
        if qtype == "f32":
            return w.view(torch.uint8).reshape(rows, cols * 4)
        dtype = torch.float16 if qtype == "f16" else torch.bfloat16
        return w.to(dtype).view(torch.uint8).reshape(rows, cols * 2)
    if cols % t.block_size:
        raise ValueError(f"a row of {cols} values is not a multiple of the {qtype} block size {t.block_size}")
    fn = QUANTIZERS[qtype]
    nbr = cols // t.block_size
    imp = None
    if importance is not None:
        imp = importance.detach().to("cpu", torch.float32).reshape(1, cols)
        if imp.numel() != cols:
            raise ValueError(f"importance has {imp.numel()} values for rows of {cols}")
    out = torch.empty(rows, nbr * t.type_size, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMS // cols)
    for r in range(0, rows, step):
        x = w[r : r + step]
        n = x.shape[0]
        blocks = x.reshape(n * nbr, t.block_size)
        qw = sigma2 = None
        if imp is not None:
            qw = imp.expand(n, cols).reshape(n * nbr, t.block_size)
            sigma2 = (x * x).sum(-1, keepdim=True) / cols  # llama.cpp: per row, for the 32-blocks types
            sigma2 = sigma2.repeat_interleave(nbr, dim=0)
        out[r : r + n] = fn(blocks, qw, sigma2).reshape(n, nbr * t.type_size)
    return out


def dequantize_tensor(data: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[rows, row_bytes]`` -> float32 ``[rows, cols]``."""
    t = GGML_TYPES[qtype]
    rows, cols = shape
    data = data.contiguous()
    if qtype == "f32":
        return data.view(torch.float32).reshape(rows, cols).clone()
    if qtype in ("f16", "bf16"):
        dtype = torch.float16 if qtype == "f16" else torch.bfloat16
        return data.view(dtype).reshape(rows, cols).to(torch.float32)
    blocks = data.reshape(-1, t.type_size)
    return dequantize_blocks(blocks, qtype).reshape(rows, cols)


@dataclass
class GGUFWeight:
    """A weight quantized to a ggml type: the raw blocks (``[out, row_bytes]`` uint8) and its shape.

    Stands where integer formats keep a ``qmath.QuantizedWeight``: ``dequantize()`` gives the float weight
    that the GGUF file decodes to."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]

    @property
    def bits(self) -> int:
        return GGML_TYPES[self.qtype].bits

    def dequantize(self) -> torch.Tensor:
        return dequantize_tensor(self.data, self.qtype, self.shape)
