"""iq4_nl: non-linear 4-bit, 32-element blocks indexing a 16-value table (llama.cpp falls back to it from the
i-quants; kept for ``layer_config``).  Layout: [d fp16][qs 16], value = d * KVALUES_IQ4NL[q]."""

from __future__ import annotations

import torch

from .blocks import _bytes_f16, _f16_bytes, _imatrix_weights, _nibbles, _signed_absmax, pack_nibbles
from .types import GROUP_MAX_EPS

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


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


def dequantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
    return _bytes_f16(b[:, :2]) * values[_nibbles(b[:, 2:]).long()]


CODECS = {"iq4_nl": (quantize_iq4_nl, dequantize_iq4_nl)}
