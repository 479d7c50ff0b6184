"""Round-to-nearest quantization, plain and optimized.  Pure tensor code: imports no model code.

Optimized RTN searches, per group, the clipping ratio ``r`` (min and max both scaled by ``r``) that minimises
the importance-weighted squared error ``sum_j imp[j] * (w[j] - w_hat[j])**2``, where ``imp[j]`` is the mean of
the squared calibration activations of input channel ``j`` (an "importance matrix").  Plain RTN uses r = 1.
"""

from __future__ import annotations

import torch

from .qmath import QuantizedWeight, compute_params, quantize_groups, quantize_weight, to_groups


def search_grid(lowest: float = 0.7, steps: int = 31) -> torch.Tensor:
    """Clip ratios tried by the search, from ``lowest`` to 1.0 inclusive."""
    if not 0 < lowest <= 1:
        raise ValueError(f"the lowest search ratio must be in (0, 1], got {lowest}")
    return torch.linspace(lowest, 1.0, steps)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    return quantize_weight(w, bits, group_size, sym)


@torch.no_grad()
def optimized_rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    importance: torch.Tensor | None,
    grid: torch.Tensor | None = None,
) -> QuantizedWeight:
    """RTN with a per-group clip-ratio search weighted by ``importance`` ([in_features], >= 0)."""
    w32 = w.detach().to(torch.float32)
    out_f, in_f = w32.shape
    if importance is None:
        importance = torch.ones(in_f, device=w32.device)
    imp = importance.detach().to(device=w32.device, dtype=torch.float32).reshape(1, in_f)
    if imp.shape[1] != in_f:
        raise ValueError(f"importance has {imp.shape[1]} channels but the weight has {in_f} input features")
    # keep dead channels from making every candidate look equal
    imp = imp + imp.mean().clamp(min=1e-12) * 1e-3
    imp_g = to_groups(imp.expand(out_f, in_f) if group_size == 0 else imp, group_size)
    wg = to_groups(w32, group_size)
    grid = search_grid() if grid is None else grid
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=w32.device)
    best_ratio = torch.ones_like(best_err)
    for ratio in grid.tolist():
        scale, zp = compute_params(wg, bits, sym, ratio, ratio)
        _, wq = quantize_groups(wg, scale, zp, bits)
        err = ((wg - wq).pow_(2) * imp_g).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return quantize_weight(w32, bits, group_size, sym, alpha=best_ratio, beta=best_ratio)
