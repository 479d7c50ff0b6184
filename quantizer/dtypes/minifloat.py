"""Element grids of the low-bit floating-point types (OCP MX / NVIDIA NVFP4 / FP8) and the shared machinery of
the float weight families (``mx``, ``nvfp``, ``fp8``): rounding onto a grid, codes, scale expansion, the packed
weight, optimized RTN's scale search and SignRound's tunable float linear.

An element type is a sign-magnitude minifloat with ``mbits`` mantissa bits, smallest normal exponent ``emin``
(subnormals below it) and a saturating maximum ``max``; or (``kind="int"``) a symmetric sign-magnitude integer
with ``mbits`` fraction bits (MXINT).  Rounding is to nearest, ties to even (the OCP MX spec, NVIDIA's NVFP4
and IEEE casts round that way), saturating at ``max``.

A group's scale multiplies its elements: ``w ≈ elem * scale``.  How the scale is taken is the family's:
a power of two (MX's E8M0), an FP8-E4M3 value divided by a per-tensor global scale (NVFP4), or float32 (FP8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Element:
    name: str
    bits: int
    mbits: int  # mantissa bits (float) or fraction bits (int)
    emin: int  # exponent of the smallest normal (float); unused for int
    max: float
    kind: str = "float"
    # SignRound's rounding offset ``v`` (kept in [-0.5, 0.5]) is in this many element units; None: in units of the
    # local grid step.  E2M1 takes 1.0, the reference tool's unit for FP4: the elements below 2, most of a
    # group's, have a step of 0.5 and so get a full step's reach, where step units would give them half of one.
    offset_unit: float | None = None

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two not above ``max`` (the OCP MX spec's ``emax_elem``)."""
        return int(math.floor(math.log2(self.max)))


E2M1 = Element("e2m1", 4, 1, 0, 6.0, offset_unit=1.0)
E4M3 = Element("e4m3", 8, 3, -6, 448.0)
# MX integers, symmetric as the reference tool and its checkpoints hold them (no -2: codes are sign-magnitude)
INT4_MX = Element("int4", 4, 2, 0, 1.75, kind="int")  # k/4, k in -7..7
INT8_MX = Element("int8", 8, 6, 0, 127 / 64, kind="int")  # k/64, k in -127..127
ELEMENTS = {e.name: e for e in (E2M1, E4M3, INT4_MX, INT8_MX)}

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def grid_step(a: torch.Tensor, elem: Element) -> torch.Tensor:
    """The spacing of ``elem``'s grid around magnitudes ``a`` (>= 0): 2**(exponent - mbits), the exponent
    floored at ``emin`` (subnormals share its spacing)."""
    if elem.kind == "int":
        return torch.full_like(a, 2.0 ** -elem.mbits)
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1 (exact, no log rounding)
    e = (e - 1).clamp(min=elem.emin)
    return torch.ldexp(torch.ones_like(a), (e - elem.mbits).to(torch.int32))


def round_to_grid(x: torch.Tensor, elem: Element) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest value of ``elem``, ties to even, saturating at ±max."""
    if elem.kind == "int":
        step = 2.0 ** -elem.mbits
        top = 2 ** (elem.bits - 1) - 1
        return (x / step).round().clamp(-top, top) * step
    a = x.abs().clamp(max=elem.max)
    step = grid_step(a, elem)
    q = (a / step).round() * step  # torch.round is half to even; a/step and q*step are exact (powers of two)
    return torch.copysign(q.clamp(max=elem.max), x)


class _RoundGrid(torch.autograd.Function):
    """Round to the grid with a straight-through gradient inside the grid's range; a value past ±max saturates,
    so its gradient is 0 (a clamp's), and a clip factor that makes elements saturate sees what that costs."""

    @staticmethod
    def forward(ctx, x, elem):  # type: ignore[override]
        ctx.save_for_backward(x.abs() <= elem.max)
        return round_to_grid(x, elem)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def round_grid_ste(x: torch.Tensor, elem: Element) -> torch.Tensor:
    return _RoundGrid.apply(x, elem)


def encode(values: torch.Tensor, elem: Element) -> torch.Tensor:
    """Grid values -> uint8 codes: E2M1 sign<<3 | magnitude index; E4M3 its IEEE-style byte (float8_e4m3fn);
    MXINT sign-magnitude in ``bits`` bits (the top bit the sign, as the reference tool packs MXINT4)."""
    if elem is E2M1:
        a = values.abs()
        idx = torch.bucketize(a, E2M1_VALUES.to(a.device))  # exact values: index of the equal entry
        return (idx.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3))
    if elem is E4M3:
        return values.to(torch.float8_e4m3fn).view(torch.uint8)
    if elem.kind == "int":
        q = (values * 2 ** elem.mbits).round().to(torch.int16)  # -0.0 keeps its sign bit, as the reference packs it
        return (q.abs() | (torch.signbit(values).to(torch.int16) << (elem.bits - 1))).to(torch.uint8)
    raise ValueError(f"no code for element type {elem.name}")


def decode(codes: torch.Tensor, elem: Element) -> torch.Tensor:
    """uint8 codes -> float32 values (inverse of ``encode``)."""
    if elem is E2M1:
        c = codes.to(torch.long)
        mag = E2M1_VALUES.to(codes.device)[c & 7]
        return torch.where((c & 8) != 0, -mag, mag)
    if elem is E4M3:
        return codes.view(torch.float8_e4m3fn).to(torch.float32)
    if elem.kind == "int":
        c = codes.to(torch.int16)
        sign_bit = 1 << (elem.bits - 1)
        c = torch.where((c & sign_bit) != 0, -(c & (sign_bit - 1)), c)
        return c.to(torch.float32) * 2.0 ** -elem.mbits
    raise ValueError(f"no code for element type {elem.name}")


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to FP8-E4M3 (saturating), as float32."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)


def pow2_floor_ste(x: torch.Tensor) -> torch.Tensor:
    """2**floor(log2 x) with the gradient of x (straight through the floor)."""
    _, e = torch.frexp(x.detach())
    p = torch.ldexp(torch.ones_like(x.detach()), (e - 1).to(torch.int32))
    return (p - x).detach() + x


def pow2_ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2 x) with the gradient of x."""
    m, e = torch.frexp(x.detach())
    e = torch.where(m == 0.5, e - 1, e)  # an exact power of two stays
    p = torch.ldexp(torch.ones_like(x.detach()), e.to(torch.int32))
    return (p - x).detach() + x


# --------------------------------------------------------------------------------------------------------------
# group layouts: groups along the input dimension (group_size > 0, -1 = per row, 0 = per tensor) or 2-D blocks


@dataclass(frozen=True)
class Layout:
    """How a weight's scales are laid out: ``block`` (rows, cols) tiles; a group of G input channels is (1, G),
    a row is (1, in), the tensor is (out, in)."""

    rows: int
    cols: int

    @classmethod
    def of(cls, shape: tuple[int, int], group_size: "int | tuple[int, int]") -> "Layout":
        out_f, in_f = shape
        if isinstance(group_size, tuple):
            return cls(min(group_size[0], out_f), min(group_size[1], in_f))
        if group_size == 0:
            return cls(out_f, in_f)
        if group_size == -1 or group_size >= in_f:
            return cls(1, in_f)
        return cls(1, group_size)

    def n_scales(self, shape: tuple[int, int]) -> tuple[int, int]:
        return -(-shape[0] // self.rows), -(-shape[1] // self.cols)

    def tiles(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [R, C, rows*cols] (zero padded)."""
        out_f, in_f = w.shape
        r, c = self.n_scales((out_f, in_f))
        pad_r, pad_c = r * self.rows - out_f, c * self.cols - in_f
        if pad_r or pad_c:
            w = nn.functional.pad(w, (0, pad_c, 0, pad_r))
        return w.reshape(r, self.rows, c, self.cols).permute(0, 2, 1, 3).reshape(r, c, self.rows * self.cols)

    def untile(self, t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        r, c = t.shape[:2]
        w = t.reshape(r, c, self.rows, self.cols).permute(0, 2, 1, 3).reshape(r * self.rows, c * self.cols)
        return w[:out_f, :in_f]

    def expand(self, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """[R, C] scales -> [out, in]."""
        return scale.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)[: shape[0], : shape[1]]


# --------------------------------------------------------------------------------------------------------------
# the packed weight


@dataclass
class FloatQuantizedWeight:
    """A weight of a float family: element ``codes`` uint8 [out, in], ``scale`` float32 [R, C] (one per tile of
    ``layout``: the effective scale, or for NVFP4 the FP8 group scale before division by ``global_scale``),
    ``global_scale`` float32 [1] (NVFP4) or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    elem_name: str
    bits: int
    block: tuple  # (rows, cols) of the scale tiles
    data_type: str
    global_scale: torch.Tensor | None = None

    @property
    def elem(self) -> Element:
        return ELEMENTS[self.elem_name]

    @property
    def layout(self) -> Layout:
        return Layout(int(self.block[0]), int(self.block[1]))

    def effective_scale(self) -> torch.Tensor:
        """[R, C] float32: what one element unit is worth."""
        s = self.scale.to(torch.float32)
        return s / self.global_scale.to(torch.float32) if self.global_scale is not None else s

    def values(self) -> torch.Tensor:
        return decode(self.codes, self.elem)

    def dequantize(self) -> torch.Tensor:
        shape = tuple(self.codes.shape)
        return self.values() * self.layout.expand(self.effective_scale(), shape)


# --------------------------------------------------------------------------------------------------------------
# quantizing with a scale rule; the families give the rule


ScaleRule = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]
"""(per-tile amax [R, C] (already times the clip factor), global scale or None) -> (stored scale, effective scale)"""


def qdq_tiles(tiles: torch.Tensor, eff: torch.Tensor, elem: Element, v: torch.Tensor | None = None,
              ste: bool = False) -> torch.Tensor:
    """Grid values of ``tiles`` [R, C, n] for effective scales ``eff`` [R, C] (the elements, not times scale);
    ``v``: rounding offsets, in ``elem.offset_unit`` (or, where it has none, in units of the local grid step)."""
    x = tiles / eff.unsqueeze(-1)
    if v is not None:
        if elem.offset_unit is not None:
            x = x + v * elem.offset_unit
        else:
            x = x + v * grid_step(x.detach().abs().clamp(max=elem.max), elem)
    return round_grid_ste(x, elem) if ste else round_to_grid(x, elem)


def quantize_with(w: torch.Tensor, layout: Layout, elem: Element, rule: ScaleRule, data_type: str,
                  factor: torch.Tensor | float = 1.0, v_tiles: torch.Tensor | None = None,
                  global_scale: torch.Tensor | None = None) -> FloatQuantizedWeight:
    """Quantize ``w`` [out, in] with per-tile amax times ``factor`` through ``rule``."""
    shape = tuple(w.shape)
    tiles = layout.tiles(w.detach().to(torch.float32))
    amax = tiles.abs().amax(-1) * factor
    stored, eff = rule(amax, global_scale)
    q = qdq_tiles(tiles, eff, elem, v_tiles)
    values = layout.untile(q, shape)
    return FloatQuantizedWeight(encode(values, elem), stored.to(torch.float32), elem.name, elem.bits,
                                (layout.rows, layout.cols), data_type, global_scale)


def searched_factors(w: torch.Tensor, layout: Layout, elem: Element, rule: ScaleRule, importance: torch.Tensor,
                     global_scale: torch.Tensor | None, lowest: float, steps: int = 21) -> torch.Tensor:
    """Per tile, the clip factor in [lowest, 1] on the tile's amax whose quantized weights have the least
    importance-weighted squared error (importance: per input channel); [R, C]."""
    shape = tuple(w.shape)
    tiles = layout.tiles(w.detach().to(torch.float32))
    imp = layout.tiles(importance.to(torch.float32).to(w.device).clamp_min(0).expand(shape[0], -1).contiguous())
    imp = imp + 1e-8 * imp.mean().clamp_min(1e-12)  # a channel never seen still counts a little
    amax = tiles.abs().amax(-1)
    best_err = best_factor = None
    for f in torch.linspace(lowest, 1.0, steps).tolist():
        _, eff = rule(amax * f, global_scale)
        err = ((qdq_tiles(tiles, eff, elem) * eff.unsqueeze(-1) - tiles).pow(2) * imp).sum(-1)
        if best_err is None:
            best_err, best_factor = err, torch.full_like(err, f)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_factor = torch.where(better, torch.full_like(err, f), best_factor)
    return best_factor


def weighted_search(w: torch.Tensor, layout: Layout, elem: Element, rule: ScaleRule, data_type: str,
                    importance: torch.Tensor, global_scale: torch.Tensor | None, lowest: float) -> FloatQuantizedWeight:
    """Optimized RTN: each tile quantized with its ``searched_factors`` clip factor."""
    factor = searched_factors(w, layout, elem, rule, importance, global_scale, lowest)
    return quantize_with(w, layout, elem, rule, data_type, factor, global_scale=global_scale)


class TunedFloatLinear(nn.Module):
    """SignRound's tunable linear for a float family: per-weight rounding offsets ``v`` (kept in [-0.5, 0.5], in
    the element's ``offset_unit`` or units of the local grid step) and, with min/max tuning, one clip factor
    ``alpha`` per scale tile on the tile's amax before the family's scale rule takes its scale (straight through the
    rule's rounding)."""

    default_factor_lr_scale = 1.0

    def __init__(self, linear: nn.Linear, scheme, layout: Layout, elem: Element, rule: ScaleRule,
                 ste_rule: ScaleRule, minmax: bool, factor_range: tuple[float, float],
                 global_scale: torch.Tensor | None = None, start: torch.Tensor | None = None,
                 act: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> None:
        super().__init__()
        self.linear, self.scheme, self.layout, self.elem = linear, scheme, layout, elem
        self.rule, self.ste_rule, self.global_scale, self.factor_range = rule, ste_rule, global_scale, factor_range
        self.act = act
        w = linear.weight
        shape = tuple(w.shape)
        with torch.no_grad():
            tiles = layout.tiles(w.detach().to(torch.float32))
            self._tiles, self._amax = tiles, tiles.abs().amax(-1)
        self.v = nn.Parameter(torch.zeros(tiles.shape, dtype=torch.float32, device=w.device))
        r, c = layout.n_scales(shape)
        init = start if start is not None else torch.ones(r, c, device=w.device)
        self._start = init.to(w.device, torch.float32)
        self.alpha = nn.Parameter(self._start.clone()) if minmax else None

    def factors(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha is not None else []

    def _factor(self) -> torch.Tensor:
        return self.alpha if self.alpha is not None else self._start

    def qdq_weight(self) -> torch.Tensor:
        _, eff = self.ste_rule(self._amax * self._factor(), self.global_scale)
        q = qdq_tiles(self._tiles, eff, self.elem, self.v, ste=True) * eff.unsqueeze(-1)
        return self.layout.untile(q, tuple(self.linear.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return nn.functional.linear(x, self.qdq_weight().to(x.dtype), self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        if self.alpha is not None:
            self.alpha.clamp_(*self.factor_range)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v.detach().clone()}
        if self.alpha is not None:
            out["alpha"] = self.alpha.detach().clone()
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, val in state.items():
                getattr(self, name).copy_(val)

    @torch.no_grad()
    def quantized(self) -> FloatQuantizedWeight:
        return quantize_with(self.linear.weight, self.layout, self.elem, self.rule, self.scheme.data_type,
                             self._factor().detach(), self.v.detach(), self.global_scale)
