"""Integer weight quantization math.  Pure tensor code: imports no model code.

Conventions (see shared/reference/checkpoint-formats.md):
- a weight ``w`` is ``[out_features, in_features]``; groups are ``group_size`` consecutive input channels of
  one output row; ``-1`` = one group per row, ``0`` = one group for the whole tensor; a ragged last group is
  zero-padded (zeros never change the min/max because both already include 0).
- symmetric: ``maxq = 2**(bits-1)``; the side of larger magnitude (on a tie, the max) maps to ``-maxq`` so the scale may be
  negative (full range); ``q = clamp(round(w/s + v), -maxq, maxq-1)``; stored integer ``q + maxq``.
- asymmetric: ``maxq = 2**bits - 1``; ``s = (wmax - wmin)/maxq``; ``zp = round(-wmin/s)``;
  ``q = clamp(round(w/s + v) + zp, 0, maxq)``.
- scales are kept away from zero and rounded to fp16 before the integers are computed, because that is
  the precision a checkpoint stores (``ROUND_WITH_STORED``: each integer is the nearest for the stored scale).
  Plain RTN rounds as the reference writes the format (``ExportFormat.rtn_rounding``): with the float32 scale
  (``ROUND_WITH_COMPUTED``) for auto_round / GPTQ / AWQ packings, as its default RTN route does (its model-free
  route runs under torch.compile, whose graph keeps the float32 scale where the eager code casts it to fp16
  first), and with the stored scale for llm_compressor (its export re-quantizes through compressed-tensors with
  the stored scale), so plain-RTN integers equal the reference's bit for bit in both.  The two rules differ only
  where ``w / s`` lies within fp16's rounding of ``s`` of a half (SmolLM2 W2A16 g64: 5,420 of 106 million
  integers, the same weight error to six digits; INT8 per channel: 0.2% of the integers, where the stored rule
  is 0.5% lower in perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_EPS = 1e-5
ROUND_WITH_STORED = "stored"
ROUND_WITH_COMPUTED = "computed"
ROUNDING_SCALES = (ROUND_WITH_STORED, ROUND_WITH_COMPUTED)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (d round(x)/dx := 1)."""
    return (x.round() - x).detach() + x


def group_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(effective group size, number of groups per row) for a row of ``in_features``."""
    if group_size in (-1, 0) or group_size >= in_features:
        return in_features, 1
    return group_size, -(-in_features // group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, gs] (zero padded); group 0 -> [1, 1, out*in]."""
    out_f, in_f = w.shape
    if group_size == 0:
        return w.reshape(1, 1, out_f * in_f)
    gs, ng = group_layout(in_f, group_size)
    pad = gs * ng - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, ng, gs)


def from_groups(wg: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """Inverse of ``to_groups``: drop the padding and return ``[out, in]``."""
    out_f, in_f = shape
    if group_size == 0:
        return wg.reshape(out_f, in_f)
    return wg.reshape(out_f, -1)[:, :in_f]


def _fp16_round(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.float16).to(s.dtype)


def group_minmax(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min clamped to <= 0, max clamped to >= 0) of grouped weights, both ``[..., 1]``."""
    return wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)


def compute_params(
    wg: torch.Tensor,
    bits: int,
    sym: bool,
    alpha: torch.Tensor | float = 1.0,
    beta: torch.Tensor | float = 1.0,
    minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp16: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero point) of grouped weights ``[..., gs]``; both shaped ``[..., 1]``.

    ``fp16``: round the scale to the fp16 value a checkpoint stores (straight-through for its gradient); False
    keeps the float32 scale (plain RTN rounds with it, ``ROUND_WITH_COMPUTED``).

    ``minmax``: ``group_minmax(wg)`` when the caller already has it (SignRound calls this every iteration
    on the same weights).

    ``alpha``/``beta`` shrink the min/max (clipping); they may be tensors shaped ``[..., 1]`` that carry
    gradients (SignRound tunes them).  The zero point is an integer-valued float tensor.
    """
    if minmax is None:
        minmax = group_minmax(wg)
    wmin, wmax = minmax[0] * alpha, minmax[1] * beta
    if sym:
        maxq = 2 ** (bits - 1)
        # the side of larger magnitude maps to -maxq: a positive max gives a negative scale
        use_min = wmin.abs() > wmax.abs()  # a tie maps the max to -maxq (negative scale), as the reference does
        scale = torch.where(use_min, wmin, wmax) / -maxq
        sign = torch.where(use_min, torch.ones_like(scale), -torch.ones_like(scale))
        scale = sign * scale.abs().clamp(min=SCALE_EPS)
        if fp16:
            scale = scale + (_fp16_round(scale) - scale).detach()
        zp = torch.full_like(scale, float(maxq)).detach()
    else:
        maxq = 2**bits - 1
        scale = ((wmax - wmin) / maxq).clamp(min=SCALE_EPS)
        if fp16:
            scale = scale + (_fp16_round(scale) - scale).detach()
        zp = torch.round(-wmin / scale).clamp(0, maxq).detach()
    return scale, zp


def quantize_groups(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    bits: int,
    v: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored unsigned integers, dequantized weights) for grouped weights; differentiable in v and scale.

    Works for both symmetric (zp = 2**(bits-1)) and asymmetric weights: stored ``q = clamp(round(w/s+v)+zp)``.
    """
    maxq = 2**bits - 1
    q = torch.clamp(round_ste(wg / scale + v) + zp, 0, maxq)
    return q, (q - zp) * scale


@dataclass
class QuantizedWeight:
    """The integers and parameters of one quantized weight, in [out, ...] orientation.

    qweight: uint8 [out, in] stored integers; scale: float32 [out, n_groups] (fp16-exact values, may be
    negative for symmetric); zero: int32 [out, n_groups]; for group_size 0 the single group is repeated per
    output row so every format sees the per-row layout.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero, self.group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] integers with [out, n_groups] scale/zero -> float [out, in]."""
    out_f, in_f = q.shape
    gs, ng = group_layout(in_f, group_size)
    idx = torch.arange(in_f, device=q.device) // gs
    return (q.to(torch.float32) - zero[:, idx].to(torch.float32)) * scale[:, idx].to(torch.float32)


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | float = 0.0,
    alpha: torch.Tensor | float = 1.0,
    beta: torch.Tensor | float = 1.0,
    minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
    rounding_scale: str = ROUND_WITH_STORED,
) -> QuantizedWeight:
    """Quantize a float weight ``[out, in]`` (no gradients) and return its integers and parameters.

    ``minmax``: the per-group (min, max) that ``alpha``/``beta`` shrink, when not the weight's own (a searched
    range: optimized RTN, or SignRound started from one).  ``rounding_scale``: which scale the integers (and an
    asymmetric zero point) are rounded with, ``ROUND_WITH_STORED`` (the fp16 one the checkpoint keeps, the
    default) or ``ROUND_WITH_COMPUTED`` (the float32 one; plain RTN).  The stored scale is fp16-exact either way.
    """
    if rounding_scale not in ROUNDING_SCALES:
        raise ValueError(f"rounding_scale must be one of {ROUNDING_SCALES}, got {rounding_scale!r}")
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        wg = to_groups(w32, group_size)
        computed = rounding_scale == ROUND_WITH_COMPUTED
        rounding, zp = compute_params(wg, bits, sym, alpha, beta, minmax, fp16=not computed)
        scale = _fp16_round(rounding) if computed else rounding  # the stored scale is fp16-exact either way
        if not isinstance(v, float):
            v = to_groups(v.to(torch.float32), group_size)
        q, _ = quantize_groups(wg, rounding, zp, bits, v)
        out_f, in_f = w.shape
        q = from_groups(q, (out_f, in_f), group_size).to(torch.uint8)
        scale, zp = scale.squeeze(-1), zp.squeeze(-1)
        if group_size == 0:
            scale, zp = scale.reshape(1, 1).expand(out_f, 1), zp.reshape(1, 1).expand(out_f, 1)
        return QuantizedWeight(q, scale.contiguous(), zp.to(torch.int32).contiguous(), bits, group_size, sym)


class _QuantDequant(torch.autograd.Function):
    """``(clamp(round(wg/s + v) + zp, 0, maxq) - zp) * s`` with the straight-through round, in few passes.

    Autograd through the composed ops needs about 25 passes over the weight per step; this needs 8 forward
    and 6 backward, with the same gradients: d/dv = s * m and d/ds = sum((q - zp) - m * wg / s) per group,
    where ``m`` marks the weights inside the clamp range (bounds included, as torch.clamp's gradient)."""

    @staticmethod
    def forward(ctx, wg, scale, zp, v, maxq):  # type: ignore[override]
        t = torch.round(wg / scale + v).add_(zp)
        inside = (t >= 0) & (t <= maxq)
        qz = t.clamp_(0, maxq).sub_(zp)
        ctx.save_for_backward(wg, scale, qz, inside)
        return qz * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        wg, scale, qz, inside = ctx.saved_tensors
        g_in = torch.where(inside, grad, 0.0)
        grad_v = g_in * scale if ctx.needs_input_grad[3] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * qz).sum(-1, keepdim=True) - (g_in * wg).sum(-1, keepdim=True) / scale
        return None, grad_scale, None, grad_v, None


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | float = 0.0,
    alpha: torch.Tensor | float = 1.0,
    beta: torch.Tensor | float = 1.0,
    grouped: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Differentiable quantize-dequantize of ``w`` (float32), same shape; gradients flow to v, alpha, beta.

    ``grouped``: ``(to_groups(w.float()), group_minmax(...))`` precomputed for a weight that does not change."""
    if grouped is None:
        wg = to_groups(w.to(torch.float32), group_size)
        minmax = group_minmax(wg)
    else:
        wg, minmax = grouped
    scale, zp = compute_params(wg, bits, sym, alpha, beta, minmax)
    if not isinstance(v, float):
        v = to_groups(v, group_size)
    if wg.requires_grad or isinstance(v, float):
        _, wq = quantize_groups(wg, scale, zp, bits, v)
    else:
        wq = _QuantDequant.apply(wg, scale, zp, v, float(2**bits - 1))
    return from_groups(wq, tuple(w.shape), group_size)
