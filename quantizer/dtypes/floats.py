"""The float weight families: OCP microscaling (``mx_fp``, ``mx_fp_rceil``, ``mx_int``), NVIDIA's NVFP4
(``nv_fp``) and FP8-E4M3 (``fp``).  Each family is its scale rule on top of ``minifloat``'s element grids;
quantize and dequantize sit side by side there (``quantize_with`` / ``FloatQuantizedWeight.dequantize``).

- MX (OCP Microscaling Formats v1.0, section 6.3): groups of 32 input channels share an E8M0 scale
  ``2**(floor(log2 amax) - emax_elem)`` (``mx_fp``) or, NVIDIA's round-up rule, ``2**ceil(log2(amax / max_elem))``
  (``mx_fp_rceil``: never clips the group's largest element); the exponent is kept in [-127, 127]. Elements:
  E2M1 at 4 bits, E4M3 at 8; ``mx_int`` elements are k/4 for k in -7..7 (symmetric, sign-magnitude codes, as the reference's MXINT4).
- NVFP4: E2M1 elements in groups of 16; each group's scale ``amax / 6`` is stored in FP8-E4M3 after multiplying
  by the tensor's global scale ``448 * 6 / amax(tensor)``; the effective scale is ``fp8_scale / global``.
- FP8 (``fp``, 8 bits): E4M3 elements, scale ``amax / 448`` in float32 per tensor (group_size 0), per output
  channel (-1), per group, or per 2-D block (group_size ``(128, 128)``: FP8_BLOCK).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import SchemeError
from ..qmath import ROUND_WITH_COMPUTED
from . import WeightFamily, register_family
from .minifloat import (
    E2M1, E4M3, INT4_MX, Element, FloatQuantizedWeight, Layout, TunedFloatLinear, fp8_e4m3, pow2_ceil_ste,
    pow2_floor_ste, qdq_tiles, quantize_with, searched_factors, weighted_search,
)

E8M0_EXP = 127  # E8M0 exponents are kept in [-127, 127]
FP8_EPS = float(torch.finfo(torch.float8_e4m3fn).eps)  # a zero NVFP4 group scale becomes this (as compressed-tensors)
FP32_EPS = float(torch.finfo(torch.float32).eps)
# clip factors: optimized RTN searches [lowest, 1]; SignRound's alpha moves in this range (wider with alg_ext)
FACTOR_RANGE = (0.5, 1.0)
ALG_EXT_FACTOR_RANGE = (0.5, 2.0)


class _FloatFamily(WeightFamily):
    """What the float families share; subclasses give the element type, the layout and the scale rule."""

    weight_type = FloatQuantizedWeight
    group_sizes: tuple = ()  # the group sizes the type fixes (empty: any)

    def element(self, scheme) -> Element:
        raise NotImplementedError

    def scale_rule(self, scheme, ste: bool = False):
        """(amax [R, C], global or None) -> (stored scale, effective scale)."""
        raise NotImplementedError

    def global_scale(self, weight: torch.Tensor, scheme, amax: torch.Tensor | None = None) -> torch.Tensor | None:
        """The per-tensor global scale (None: the type has none); ``amax``: a |weight| max shared with fused
        siblings instead of this weight's own."""
        return None

    def layout(self, scheme, shape: tuple[int, int]) -> Layout:
        return Layout.of(shape, scheme.group_size)

    def validate(self, scheme) -> None:
        self.element(scheme)  # raises for bits the type has no element for
        if not scheme.sym:
            raise SchemeError(f"data_type={scheme.data_type!r} is symmetric only (sym=True), got sym=False")
        if self.group_sizes and scheme.group_size not in self.group_sizes:
            raise SchemeError(
                f"data_type={scheme.data_type!r} fixes the group size to {self.group_sizes[0]}, got "
                f"group_size={scheme.group_size!r}"
            )

    def describe(self, scheme) -> str:
        return (f"W{scheme.bits}A{scheme.act_bits} {scheme.data_type} ({self.element(scheme).name}) group "
                f"{scheme.group_size}")

    def type_name(self, scheme) -> str:
        return f"{scheme.data_type}{scheme.bits}"

    def storage_bits(self, scheme, in_features: int, out_features: int, with_metadata: bool = True) -> int:
        weights = scheme.bits * in_features * out_features
        if not with_metadata:
            return weights
        r, c = self.layout(scheme, (out_features, in_features)).n_scales((out_features, in_features))
        return weights + r * c * self.scale_bits

    scale_bits = 8

    def quantize(self, weight: torch.Tensor, scheme, importance: torch.Tensor | None,
                 search_lowest: float = 0.7, global_amax: torch.Tensor | None = None,
                 rtn_rounding: str = ROUND_WITH_COMPUTED) -> FloatQuantizedWeight:
        w = weight.detach().to(torch.float32)
        layout, elem = self.layout(scheme, tuple(w.shape)), self.element(scheme)
        g = self.global_scale(w, scheme, global_amax)
        if importance is None:
            return quantize_with(w, layout, elem, self.scale_rule(scheme), scheme.data_type, global_scale=g)
        return weighted_search(w, layout, elem, self.scale_rule(scheme), scheme.data_type, importance, g,
                               min(search_lowest, 1.0))

    def tuning_importance(self, scheme, options) -> bool:
        return options.init_range == "search" or options.enable_alg_ext

    def float_forward_importance(self, scheme, options) -> bool:
        return self.tuning_importance(scheme, options)

    def tuner(self, linear: nn.Linear, scheme, options, importance: torch.Tensor | None,
              global_amax: torch.Tensor | None = None) -> TunedFloatLinear:
        w = linear.weight.detach().to(torch.float32)
        layout, elem = self.layout(scheme, tuple(w.shape)), self.element(scheme)
        g = self.global_scale(w, scheme, global_amax)
        start = None
        if importance is not None:  # start each tile's clip factor where optimized RTN's search ends
            start = searched_factors(w, layout, elem, self.scale_rule(scheme), importance, g, FACTOR_RANGE[0])
        factor_range = ALG_EXT_FACTOR_RANGE if options.enable_alg_ext else FACTOR_RANGE
        return TunedFloatLinear(linear, scheme, layout, elem, self.scale_rule(scheme), self.scale_rule(scheme, True),
                                options.enable_minmax_tuning, factor_range, g, start)

    # -- activations: the same element and scale rule on [tokens, features] ---------------------------------
    def act_quantize(self, x: torch.Tensor, scheme, static_amax: torch.Tensor | None,
                     global_scale: torch.Tensor | None = None, max_ratio: torch.Tensor | float = 1.0,
                     min_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Quantize-dequantize activations ``x`` [tokens, features] (float32) with a straight-through gradient;
        ``scheme`` is the act view (bits/group_size/data_type = the act_* fields); ``global_scale``: a stored
        NVFP4 activation global scale (else one from ``static_amax``); ``max_ratio``: a clip ratio on each tile's
        own amax (dynamic scales; gradients reach it through the scale rule's rounding); ``min_ratio`` is for
        asymmetric types, which the float families are not."""
        layout, elem = Layout.of(tuple(x.shape), scheme.group_size), self.element(scheme)
        tiles = layout.tiles(x)
        g = global_scale.to(x.device) if global_scale is not None else self.act_global_scale(x, static_amax)
        if static_amax is not None and scheme.group_size == 0 and g is None:
            amax = static_amax.to(x.device, torch.float32).reshape(1, 1)
        else:
            amax = tiles.detach().abs().amax(-1) * max_ratio
        _, eff = self.scale_rule(scheme, ste=True)(amax, g)
        q = qdq_tiles(tiles, eff, elem, ste=True) * eff.unsqueeze(-1)
        return layout.untile(q, tuple(x.shape))

    def act_global_scale(self, x: torch.Tensor, static_amax: torch.Tensor | None) -> torch.Tensor | None:
        return None


class MXFamily(_FloatFamily):
    """OCP microscaling: E8M0 power-of-two scales over groups of 32."""

    name = "mx"
    group_sizes = (32,)

    def data_types(self) -> tuple[str, ...]:
        return ("mx_fp", "mx_fp_rceil", "mx_int")

    def presets(self):
        from ..schemes import QuantScheme

        def mx(bits, data_type, act_data_type):
            return QuantScheme(bits=bits, group_size=32, data_type=data_type, act_bits=bits, act_group_size=32,
                               act_data_type=act_data_type)

        return {
            "MXFP4": mx(4, "mx_fp", "mx_fp"),
            "MXFP4_RCEIL": mx(4, "mx_fp", "mx_fp_rceil"),
            "MXFP8": mx(8, "mx_fp", "mx_fp"),
            "MXFP8_RCEIL": mx(8, "mx_fp", "mx_fp_rceil"),
            "MXINT4": mx(4, "mx_int", "mx_int"),
        }

    def element(self, scheme) -> Element:
        table = {("mx_int", 4): INT4_MX, ("mx_fp", 4): E2M1, ("mx_fp", 8): E4M3}
        kind = "mx_int" if scheme.data_type == "mx_int" else "mx_fp"
        if (kind, scheme.bits) not in table:
            raise SchemeError(
                f"data_type={scheme.data_type!r} has no {scheme.bits}-bit element; valid: "
                + ("4 bits (MXINT4)" if kind == "mx_int" else "4 bits (E2M1, MXFP4) or 8 bits (E4M3, MXFP8)")
            )
        return table[(kind, scheme.bits)]

    def scale_rule(self, scheme, ste: bool = False):
        elem = self.element(scheme)
        rceil = scheme.data_type == "mx_fp_rceil"

        def rule(amax: torch.Tensor, _g):
            if rceil:  # 2**ceil(log2(amax / max)); an all-zero group gets 2**1 as the reference tool gives it
                x = torch.where(amax == 0, torch.full_like(amax, 2.0 * elem.max), amax) / elem.max
                p = pow2_ceil_ste(x) if ste else pow2_ceil_ste(x).detach()
            else:  # 2**(floor(log2 amax) - emax); zero group: floor(log2 2) - emax
                x = torch.where(amax == 0, torch.full_like(amax, 2.0), amax)
                p = (pow2_floor_ste(x) if ste else pow2_floor_ste(x).detach()) * 2.0 ** -elem.emax
            lo, hi = 2.0 ** -E8M0_EXP, 2.0 ** E8M0_EXP
            p = p.clamp(lo, hi)
            return p, p

        return rule


class NVFP4Family(_FloatFamily):
    """NVFP4: E2M1 in groups of 16, FP8-E4M3 group scales under a float32 per-tensor global scale."""

    name = "nvfp"
    group_sizes = (16,)
    has_global_scale = True

    def data_types(self) -> tuple[str, ...]:
        return ("nv_fp", "nv_fp4", "nv_fp4_with_static_gs")

    def presets(self):
        from ..schemes import QuantScheme

        return {"NVFP4": QuantScheme(bits=4, group_size=16, data_type="nv_fp", act_bits=4, act_group_size=16,
                                     act_data_type="nv_fp4_with_static_gs")}

    def element(self, scheme) -> Element:
        if scheme.bits != 4:
            raise SchemeError(f"data_type={scheme.data_type!r} is NVFP4: bits must be 4, got {scheme.bits}")
        return E2M1

    def global_scale(self, weight: torch.Tensor, scheme, amax: torch.Tensor | None = None) -> torch.Tensor:
        return nvfp4_global_scale(weight.abs().amax() if amax is None else amax)

    def act_global_scale(self, x, static_amax):
        return nvfp4_global_scale(static_amax if static_amax is not None else x.detach().abs().amax())

    def scale_rule(self, scheme, ste: bool = False):
        def rule(amax: torch.Tensor, g: torch.Tensor):
            s = amax / E2M1.max * g.to(amax.device)
            s = s.clamp(max=E4M3.max)
            stored = (fp8_e4m3(s.detach()) - s).detach() + s if ste else fp8_e4m3(s)
            stored = torch.where(stored == 0, torch.full_like(stored, FP8_EPS), stored)
            return stored, stored / g.to(amax.device)

        return rule

    def storage_bits(self, scheme, in_features: int, out_features: int, with_metadata: bool = True) -> int:
        return super().storage_bits(scheme, in_features, out_features, with_metadata) + (32 if with_metadata else 0)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """448 * 6 / amax as float32 [1] (1 for an all-zero tensor)."""
    a = amax.detach().to(torch.float32).reshape(1)
    return torch.where(a > 0, E4M3.max * E2M1.max / a.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.ones_like(a))


def fp8_static_input_scale(amax: torch.Tensor) -> torch.Tensor:
    """A static FP8 activation scale: the calibrated max / 448, float32 [1]."""
    return (amax.detach().to(torch.float32) / E4M3.max).clamp_min(torch.finfo(torch.float32).eps).reshape(1)


class FP8Family(_FloatFamily):
    """FP8-E4M3 weights with float32 scales per tensor, channel, group or 2-D block."""

    name = "fp8"
    scale_bits = 32

    def data_types(self) -> tuple[str, ...]:
        return ("fp", "fp8", "fp8_e4m3")

    def presets(self):
        from ..schemes import QuantScheme

        return {
            "FPW8A16": QuantScheme(bits=8, group_size=0, data_type="fp"),
            "FP8_STATIC": QuantScheme(bits=8, group_size=-1, data_type="fp", act_bits=8, act_group_size=0,
                                      act_data_type="fp", act_dynamic=False),
            "FP8_BLOCK": QuantScheme(bits=8, group_size=(128, 128), data_type="fp", act_bits=8,
                                     act_group_size=128, act_data_type="fp"),
        }

    def element(self, scheme) -> Element:
        if scheme.bits != 8:
            raise SchemeError(
                f"data_type={scheme.data_type!r} is FP8 (E4M3): bits must be 8 (or 16 to keep the layer in float), "
                f"got {scheme.bits}"
            )
        return E4M3

    def validate(self, scheme) -> None:
        super().validate(scheme)
        gs = scheme.group_size
        if isinstance(gs, tuple) and (len(gs) != 2 or any(not isinstance(v, int) or v <= 0 for v in gs)):
            raise SchemeError(f"an FP8 block group_size is two positive integers (rows, cols), got {gs!r}")

    def scale_rule(self, scheme, ste: bool = False):
        def rule(amax: torch.Tensor, _g):
            s = amax / E4M3.max
            s = torch.where(s == 0, torch.full_like(s, FP32_EPS), s)
            return s, s

        return rule


for _family in (MXFamily(), NVFP4Family(), FP8Family()):
    register_family(_family)
