"""The integer weight family (``data_type="int"``): 2-8 bit affine integers per group, symmetric or asymmetric.

The math is ``qmath`` (groups, scales and zero points, quantize / dequantize, the straight-through
fake-quantizer) and ``rtn`` (plain and optimized RTN, the importance-weighted range search); this module binds
them into the registry and holds SignRound's tunable integer linear (``TunedIntLinear``): per-weight rounding
offsets ``v`` and per-group factors ``alpha``/``beta`` on the min and max.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ..qmath import (
    ROUND_WITH_COMPUTED, QuantizedWeight, fake_quantize, from_groups, group_layout, group_minmax, quantize_weight, to_groups,
)
from ..rtn import optimized_rtn_quantize, rtn_quantize, searched_range
from . import WeightFamily, register_family

if TYPE_CHECKING:  # pragma: no cover
    from ..schemes import QuantScheme


# SignRoundV2: the min/max factors may also widen a group's range, up to twice its starting min/max
ALG_EXT_FACTOR_RANGE = (0.0, 2.0)


class TunedIntLinear(nn.Module):
    """Wraps a linear layer: its weight is fake-quantized with learnable v / alpha / beta at every call."""

    factor_range = (0.0, 1.0)  # alpha / beta shrink the min / max
    default_factor_lr_scale = 1.0  # without minmax_lr, alpha / beta move at this times the rounding lr

    def __init__(
        self, linear: nn.Linear, scheme: QuantScheme, minmax: bool, search: bool = False,
        importance: torch.Tensor | None = None,
    ) -> None:
        """``search``: alpha/beta start from optimized RTN's range (weighted by ``importance``), not min/max."""
        super().__init__()
        self.linear, self.scheme = linear, scheme
        w = linear.weight
        _, n_groups = group_layout(w.shape[1], scheme.group_size)
        rows = 1 if scheme.group_size == 0 else w.shape[0]
        n_groups = 1 if scheme.group_size == 0 else n_groups
        self.v = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        with torch.no_grad():  # the weight is frozen: group it and take its min/max once, not every step
            wg = to_groups(w.detach().to(torch.float32), scheme.group_size)
            if search:
                start = searched_range(wg, scheme.bits, scheme.sym, importance, tuple(w.shape), scheme.group_size)
            else:
                start = group_minmax(wg)
            self._grouped = (wg, start)
        if minmax:
            self.alpha = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
            self.beta = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
        else:
            self.alpha = self.beta = None

    def factors(self) -> list[nn.Parameter]:
        """The min/max tuning parameters this layer has."""
        return [p for p in (self.alpha, self.beta) if p is not None]

    def _factor(self, p: nn.Parameter | None) -> torch.Tensor | float:
        return p if p is not None else 1.0

    def qdq_weight(self) -> torch.Tensor:
        s = self.scheme
        return fake_quantize(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v,
            alpha=self._factor(self.alpha), beta=self._factor(self.beta), grouped=self._grouped,
        )

    act = None  # the activations' quantize-dequantize (act_bits < 16), set by the tuner's caller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.qdq_weight().to(x.dtype)
        return nn.functional.linear(x, w, self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        for p in self.factors():
            p.clamp_(*self.factor_range)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v.detach().clone()}
        for name in ("alpha", "beta"):
            p = getattr(self, name)
            if p is not None:
                out[name] = p.detach().clone()
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, val in state.items():
                getattr(self, name).copy_(val)

    def quantized(self) -> QuantizedWeight:
        s = self.scheme
        return quantize_weight(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v.detach(),
            alpha=self.alpha.detach() if self.alpha is not None else 1.0,
            beta=self.beta.detach() if self.beta is not None else 1.0, minmax=self._grouped[1],
        )



class IntegerFamily(WeightFamily):
    name = "int"
    weight_type = QuantizedWeight
    model_free = True
    rounds_by_format = True

    def data_types(self) -> tuple[str, ...]:
        return ("int",)

    def storage_bits(self, scheme: QuantScheme, in_features: int, out_features: int,
                     with_metadata: bool = True) -> int:
        """Weight bits, plus per group a 16-bit scale and a ``bits``-bit zero point (the GPTQ/AWQ layouts keep
        a packed zero point for symmetric schemes too), as the reference tool's AutoScheme counts them."""
        weights = scheme.bits * in_features * out_features
        if not with_metadata:
            return weights
        g = scheme.group_size
        groups = 1 if g == 0 else out_features * (1 if g < 0 else -(-in_features // g))
        return weights + groups * (16 + scheme.bits)

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None,
                 search_lowest: float = 0.7, global_amax: torch.Tensor | None = None,
                 rtn_rounding: str = ROUND_WITH_COMPUTED) -> QuantizedWeight:
        if importance is None:
            return rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.sym, rtn_rounding)
        return optimized_rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.sym, importance, search_lowest)

    def tuning_importance(self, scheme: QuantScheme, options) -> bool:
        # the min/max tuning starts from optimized RTN's searched range: "search", SignRoundV2, or "auto" at 2 and
        # 3 bits
        return (options.init_range == "search" or options.enable_alg_ext
                or (options.init_range == "auto" and scheme.bits <= 3))

    def float_forward_importance(self, scheme: QuantScheme, options) -> bool:
        return self.tuning_importance(scheme, options)

    def act_quantize(self, x: torch.Tensor, scheme: QuantScheme, static_amax: torch.Tensor | None,
                     global_scale: torch.Tensor | None = None, max_ratio: torch.Tensor | float = 1.0,
                     min_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Quantize-dequantize activations ``x`` [tokens, features] (float32) with a straight-through gradient:
        symmetric ``amax / (2**(bits-1) - 1)`` or asymmetric min/max scales per token (-1), group or tensor (0);
        ``static_amax``: the calibrated per-tensor amax of a static scheme (integers have no ``global_scale``);
        ``max_ratio`` / ``min_ratio``: clip ratios on each input's own max / min (dynamic scales)."""
        xg = to_groups(x, scheme.group_size) if scheme.group_size != -1 else x.unsqueeze(1)
        xd = xg.detach()
        if scheme.sym:
            amax = (static_amax.to(x.device, torch.float32) if static_amax is not None
                    else xd.abs().amax(-1, keepdim=True) * max_ratio)
            qmax = 2 ** (scheme.bits - 1) - 1
            s = (amax / qmax).clamp_min(1e-8)
            q = (xg / s).clamp(-qmax - 1, qmax)
            out = ((q.round() - q).detach() + q) * s
        else:
            lo = xd.amin(-1, keepdim=True).clamp(max=0) * min_ratio
            hi = xd.amax(-1, keepdim=True).clamp(min=0) * max_ratio
            qmax = 2 ** scheme.bits - 1
            s = ((hi - lo) / qmax).clamp_min(1e-8)
            zp = -lo / s
            zp = (zp.round() - zp).detach() + zp  # a tuned min reaches the zero point straight through
            q = (xg / s + zp).clamp(0, qmax)
            out = ((q.round() - q).detach() + q - zp) * s
        if scheme.group_size == -1:
            return out.squeeze(1)
        return from_groups(out, tuple(x.shape), scheme.group_size)

    def tuner(self, linear: nn.Linear, scheme: QuantScheme, options, importance: torch.Tensor | None,
              global_amax: torch.Tensor | None = None) -> TunedIntLinear:
        search = self.tuning_importance(scheme, options)
        tuner = TunedIntLinear(linear, scheme, options.enable_minmax_tuning, search, importance if search else None)
        if options.enable_alg_ext:
            tuner.factor_range = ALG_EXT_FACTOR_RANGE
        return tuner


register_family(IntegerFamily())
