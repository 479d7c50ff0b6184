"""Round-to-nearest quantization, plain and optimized.  Pure tensor code: imports no model code.

Optimized RTN minimises, per group, the importance-weighted squared error
``sum_j imp[j] * (w[j] - w_hat[j])**2`` where ``imp[j]`` is the mean squared calibration activation of input
channel ``j`` (an "importance matrix"):

- symmetric: candidate scales map the group's largest-magnitude weight to ``-(m)`` for a grid of integer
  ranges ``m`` around ``2**(bits-1)``; each candidate's integers are then given the weighted least-squares
  scale ``sum(imp*w*q) / sum(imp*q*q)``, and the candidate with the smallest weighted error wins;
- asymmetric: a grid of clip ratios shrinking min and max together.
Plain RTN's range (symmetric) or ratio 1.0 (asymmetric) is always among the candidates.
"""

from __future__ import annotations

import torch

from .qmath import ROUND_WITH_COMPUTED, SCALE_EPS, QuantizedWeight, compute_params, group_minmax, quantize_groups, quantize_weight, to_groups


def search_grid(lowest: float = 0.7, steps: int = 31) -> torch.Tensor:
    """Clip ratios tried by the asymmetric search, from ``lowest`` to 1.0 inclusive."""
    if not 0 < lowest <= 1:
        raise ValueError(f"the lowest search ratio must be in (0, 1], got {lowest}")
    return torch.linspace(lowest, 1.0, steps)


def range_grid(bits: int, lowest: float = 0.7, highest: float = 1.5, steps: int = 41) -> torch.Tensor:
    """Integer ranges ``m`` (as multiples of ``2**(bits-1)``) tried by the symmetric search; includes 1.0."""
    maxq = 2 ** (bits - 1)
    grid = torch.cat([torch.linspace(lowest, highest, steps), torch.ones(1)]) * maxq
    return torch.unique(grid)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                 rounding: str = ROUND_WITH_COMPUTED) -> QuantizedWeight:
    """Plain RTN: each group's min/max range; the stored scale is its fp16 rounding.  ``rounding``: the scale the
    integers are rounded with, by default the float32 one (``ROUND_WITH_COMPUTED``: the reference's default RTN
    auto_round checkpoints, bit for bit); ``ROUND_WITH_STORED`` as its llm_compressor export (the format's
    ``rtn_rounding``)."""
    return quantize_weight(w, bits, group_size, sym, rounding_scale=rounding)


def _importance_groups(imp: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    out_f, in_f = shape
    imp = imp.reshape(1, in_f)
    imp = imp + imp.mean().clamp(min=1e-12) * 1e-3  # keep dead channels from making candidates tie
    return to_groups(imp.expand(out_f, in_f) if group_size == 0 else imp, group_size)


@torch.no_grad()
def _sym_scale_search(wg: torch.Tensor, imp_g: torch.Tensor, bits: int, grid: torch.Tensor) -> torch.Tensor:
    """Best least-squares scale per group, ``[..., 1]`` (may be negative: full range)."""
    maxq = 2 ** (bits - 1)
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    gmax = torch.gather(wg, -1, idx)  # signed weight of largest magnitude
    gmax = torch.where(gmax.abs() < SCALE_EPS, torch.full_like(gmax, SCALE_EPS), gmax)
    wimp = wg * imp_g
    best_gain = torch.full_like(gmax, -1.0)
    best_scale = -gmax / maxq
    for m in grid.tolist():
        s = -gmax / m
        q = torch.clamp(torch.round(wg / s), -maxq, maxq - 1)
        sum_wq = (wimp * q).sum(-1, keepdim=True)
        sum_qq = (imp_g * q * q).sum(-1, keepdim=True).clamp(min=1e-20)
        gain = sum_wq * sum_wq / sum_qq  # error = sum(imp*w*w) - gain
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, sum_wq / sum_qq, best_scale)
    sign = torch.where(best_scale < 0, -1.0, 1.0)
    return sign * best_scale.abs().clamp(min=SCALE_EPS)


@torch.no_grad()
def _asym_clip_search(wg: torch.Tensor, imp_g: torch.Tensor, bits: int, grid: torch.Tensor) -> torch.Tensor:
    """Best clip ratio per group, ``[..., 1]``."""
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=wg.device)
    best_ratio = torch.ones_like(best_err)
    for ratio in grid.tolist():
        scale, zp = compute_params(wg, bits, False, ratio, ratio)
        _, wq = quantize_groups(wg, scale, zp, bits)
        err = ((wg - wq).pow_(2) * imp_g).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


@torch.no_grad()
def optimized_rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    importance: torch.Tensor | None,
    lowest: float = 0.7,
) -> QuantizedWeight:
    """RTN with a per-group scale search weighted by ``importance`` ([in_features], >= 0).

    ``lowest``: the smallest integer range (symmetric, as a multiple of ``2**(bits-1)``) or clip ratio
    (asymmetric) tried; ``AR_SEARCH_SCALE_RATIO`` sets it.
    """
    w32 = w.detach().to(torch.float32)
    start = searched_range(to_groups(w32, group_size), bits, sym, importance, tuple(w32.shape), group_size, lowest)
    return quantize_weight(w32, bits, group_size, sym, minmax=start)


@torch.no_grad()
def searched_range(
    wg: torch.Tensor,
    bits: int,
    sym: bool,
    importance: torch.Tensor | None,
    shape: tuple[int, int],
    group_size: int,
    lowest: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of grouped weights ``wg`` (of a weight ``shape``) whose plain min/max parameters
    (``compute_params``) are optimized RTN's: what ``optimized_rtn_quantize`` quantizes with, and a starting range
    for SignRound that its alpha/beta then shrink.

    Symmetric: the searched (signed) scale ``s`` becomes a range with one side at ``-s * 2**(bits-1)`` (the side
    that maps to ``-2**(bits-1)``) and the other at 0.  Asymmetric: the searched clip ratio times min and max."""
    in_f = shape[1]
    imp = torch.ones(in_f) if importance is None else importance.detach()
    imp = imp.to(device=wg.device, dtype=torch.float32)
    if imp.numel() != in_f:
        raise ValueError(f"importance has {imp.numel()} channels but the weight has {in_f} input features")
    imp_g = _importance_groups(imp, shape, group_size)
    if sym:
        maxq = 2 ** (bits - 1)
        scale = _sym_scale_search(wg, imp_g, bits, range_grid(bits, lowest))
        zero = torch.zeros_like(scale)
        # a positive scale maps the min side to -maxq, a negative one the max side (compute_params' convention)
        return torch.where(scale > 0, -scale * maxq, zero), torch.where(scale < 0, -scale * maxq, zero)
    ratio = _asym_clip_search(wg, imp_g, bits, search_grid(lowest))
    wmin, wmax = group_minmax(wg)
    return wmin * ratio, wmax * ratio
