"""Activation quantization (schemes with ``act_bits`` < 16): the inputs of a quantized linear layer are
quantized and dequantized before its matmul, in SignRound's tuned block (straight-through gradient) and in the
quantized model in memory (a forward pre-hook), so that the loss being tuned and the perplexity reported both see
what a W4A4 / W8A8 kernel computes.  The activations' data type does the math (``WeightFamily.act_quantize``).

Static schemes (``act_dynamic=False``, FP8_STATIC) and NVFP4's activation global scale need one number per layer
from the calibration data: the largest |input| seen (``needs_amax``), measured by ``importance.ImportanceHooks``
on the float path and kept on the exported layer (``QuantizedLayer.input_amax``) for the formats that write it.

SignRound also tunes an activation clip ratio per layer (``ActQuantizer``'s ``max_ratio``, in [0, 1], on the amax
a scale is taken from; straight through the rounding), as the reference does: by default for static scales, whose
tuned range is what the checkpoint stores (the calibrated amax times the ratio), and under
``AR_ENABLE_ACT_MINMAX_TUNING`` for dynamic ones too (with ``min_ratio`` on the min of asymmetric integers).  A
dynamic scale is taken by the serving kernel from each input, so no checkpoint can carry such a ratio: those runs
are for evaluation in memory, and an export of them is refused.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .dtypes import family_of
from .errors import AutoRoundError
from .moe import expert_layer_groups, is_input_projection
from .schemes import QuantScheme
from .. import envs
from ..log import logger

_HOOK_ATTR = "_autoround_act_hook"


def quantizes_acts(scheme: QuantScheme) -> bool:
    return not scheme.is_float and scheme.act_bits < 16


def needs_amax(scheme: QuantScheme) -> bool:
    """Whether the layer's activation quantization needs the calibrated input amax."""
    if not quantizes_acts(scheme):
        return False
    return not scheme.act_dynamic or family_of(scheme.act_scheme()).name == "nvfp"


def calibrated_amax(raw: torch.Tensor) -> torch.Tensor:
    """The amax a static activation scale is taken from: the calibration data's largest |input| times
    ``AR_ACT_SCALE``."""
    return raw * envs.AR_ACT_SCALE


def static_amax(schemes: Mapping[str, QuantScheme], seen: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The amax each static-activation layer of ``schemes`` takes its scale from (``calibrated_amax``), from the
    largest |input| ``seen`` by the calibration hooks (names as in ``schemes``, full or relative to a block).

    An MoE expert that no calibration token was routed to takes the largest amax of the same layer in the other
    experts of its MoE module, as the reference does; under ``AR_ENABLE_UNIFY_MOE_INPUT_SCALE`` every expert's
    input projections (gate/up) take that largest one, so an FP8 dispatch quantizes the MoE input once.  Any other
    static layer that saw nothing is refused with its name (it has no range to take a scale from)."""
    static = [n for n, s in schemes.items() if needs_amax(s)]
    raw = {n: seen[n] for n in static if n in seen}
    filled = 0
    for (_, layer), group in expert_layer_groups(static).items():
        got = [raw[n] for n in group if n in raw]
        if not got:
            continue
        top = max(float(t.float().max()) for t in got)
        unify = envs.AR_ENABLE_UNIFY_MOE_INPUT_SCALE and is_input_projection(layer)
        for n in group:
            if n not in raw:
                filled += 1
                raw[n] = got[0].new_tensor(top).reshape(got[0].shape)
            elif unify:
                raw[n] = raw[n].new_tensor(top).reshape(raw[n].shape)
    if filled:
        logger.info("%d MoE expert layers saw no calibration token: their static activation scales take the largest "
                    "amax of the same layer in the other experts", filled)
    missing = [n for n in static if n not in raw]
    if missing:
        raise AutoRoundError(
            f"{len(missing)} layer(s) with a static activation scale saw no calibration token (e.g. {missing[0]}), so "
            "there is no input range to take their scale from; give them a dynamic-activation or weight-only scheme "
            "in layer_config, keep them float (ignore_layers), or calibrate with data that reaches them"
        )
    return {n: calibrated_amax(raw[n]) for n in static}


def tunes_max(scheme: QuantScheme, minmax: bool) -> bool:
    """Whether SignRound tunes the layer's activation clip ratio on the max (``minmax``: the run's
    ``enable_minmax_tuning``): static scales by default (unless ``AR_ACT_SCALE`` fixes the ratio), dynamic ones
    under ``AR_ENABLE_ACT_MINMAX_TUNING``."""
    if not (minmax and quantizes_acts(scheme)):
        return False
    if scheme.act_dynamic:
        return envs.AR_ENABLE_ACT_MINMAX_TUNING
    return envs.AR_ACT_SCALE == 1.0


def tunes_min(scheme: QuantScheme, minmax: bool) -> bool:
    """Whether the ratio on the min is tuned as well: asymmetric integer activations under
    ``AR_ENABLE_ACT_MINMAX_TUNING`` (symmetric types take their scale from the max alone)."""
    return (minmax and quantizes_acts(scheme) and envs.AR_ENABLE_ACT_MINMAX_TUNING and not scheme.act_sym
            and family_of(scheme.act_scheme()).name == "int")


def check_env(plan: Mapping[str, QuantScheme], iters: int = 0, minmax: bool = True, exporting: bool = False) -> None:
    """The activation environment variables against the run's planned layers (before any work): ``AR_ACT_SCALE``
    scales calibrated activation ranges, so a run with none refuses it; ``AR_ENABLE_ACT_MINMAX_TUNING`` tunes
    dynamic activation ranges in SignRound (``iters`` > 0, with ``minmax``), and an ``exporting`` run refuses it,
    since no checkpoint can carry the ratios; ``AR_ENABLE_UNIFY_MOE_INPUT_SCALE`` needs MoE experts' input
    projections with static activation scales."""
    schemes = list(plan.values())
    if envs.AR_ENABLE_UNIFY_MOE_INPUT_SCALE:
        inputs = [n for (_, layer), group in expert_layer_groups(n for n, s in plan.items() if needs_amax(s)).items()
                  if is_input_projection(layer) for n in group]
        if not inputs:
            raise AutoRoundError(
                "AR_ENABLE_UNIFY_MOE_INPUT_SCALE is set, but no MoE expert input projection (gate_proj / up_proj) "
                "has a static activation scale to unify; unset it, or use a static-activation scheme (FP8_STATIC, "
                "NVFP4) on an MoE model"
            )
    if envs.AR_ENABLE_ACT_MINMAX_TUNING:
        dynamic = [s for s in schemes if quantizes_acts(s) and s.act_dynamic]
        why = None
        if not dynamic:
            why = ("no layer quantizes its activations with dynamic scales (static ranges are tuned without it)"
                   if any(quantizes_acts(s) for s in schemes) else "no layer quantizes its activations")
        elif iters <= 0:
            why = "iters=0 tunes nothing (the ratios are tuned by SignRound)"
        elif not minmax:
            why = "enable_minmax_tuning=False turns off the min/max tuning the ratios are part of"
        elif exporting:
            why = ("a dynamic activation scale is taken by the serving kernel from each input, so no checkpoint "
                   "format can carry a tuned ratio on it; use quantize() and evaluate in memory, or unset it to "
                   "export")
        if why is not None:
            raise AutoRoundError(f"AR_ENABLE_ACT_MINMAX_TUNING is set, but {why}")
    if envs.AR_ACT_SCALE == 1.0:
        return
    if not any(needs_amax(s) for s in schemes):
        what = ("every quantized activation takes a dynamic scale at each call, which a checkpoint cannot carry a "
                "ratio for" if any(quantizes_acts(s) for s in schemes) else "no layer quantizes its activations")
        raise AutoRoundError(
            f"AR_ACT_SCALE={envs.AR_ACT_SCALE} multiplies calibrated (static) activation ranges, but {what}; unset "
            "it or use a scheme with static activation scales (FP8_STATIC, NVFP4)"
        )


def act_qdq(x: torch.Tensor, scheme: QuantScheme, amax: torch.Tensor | None = None,
            global_scale: torch.Tensor | None = None, ratio: "tuple[torch.Tensor | float, torch.Tensor | float] | None" = None) -> torch.Tensor:
    """``x`` [..., features] quantized and dequantized as ``scheme``'s activations, in ``x``'s dtype;
    ``global_scale``: NVFP4's activation global scale as a checkpoint stores it (instead of one from ``amax``);
    ``ratio``: a dynamic scale's clip ratios (max, min; tensors, tunable) on each input's own range."""
    act = scheme.act_scheme()
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    kw = {} if ratio is None else {"max_ratio": ratio[0], "min_ratio": ratio[1]}
    out = family_of(act).act_quantize(x2, act, amax if needs_amax(scheme) else None, global_scale=global_scale,
                                      **kw)
    return out.reshape(x.shape).to(x.dtype)


class ActQuantizer:
    """A callable ``x -> act_qdq(x, scheme, amax)`` (what a tuner applies to its input).

    ``tune_max`` / ``tune_min``: SignRound's tunable clip ratios (``max_ratio`` / ``min_ratio``, parameters from
    1, clamped to [0, 1]); a static scale's ratio multiplies ``amax``, a dynamic one each input's own range.
    ``ratio``: a dynamic scale's (max, min) ratios as tuned (fixed)."""

    RANGE = (0.0, 1.0)

    def __init__(self, scheme: QuantScheme, amax: torch.Tensor | None, tune_max: bool = False,
                 tune_min: bool = False, device: torch.device | None = None,
                 ratio: "tuple[float, float] | None" = None) -> None:
        if needs_amax(scheme) and amax is None:
            raise ValueError(f"{scheme.describe()}: static activation quantization needs the calibrated input amax")
        self.scheme, self.amax = scheme, amax
        self.ratio = (torch.tensor(ratio[0]), torch.tensor(ratio[1])) if ratio is not None else None
        device = device or (amax.device if amax is not None else None)
        self.max_ratio = nn.Parameter(torch.ones((), device=device)) if tune_max else None
        self.min_ratio = nn.Parameter(torch.ones((), device=device)) if tune_min else None

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.max_ratio, self.min_ratio) if p is not None]

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.params():
            p.clamp_(*self.RANGE)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n in ("max_ratio", "min_ratio") if (p := getattr(self, n)) is not None}

    def load(self, state) -> None:
        with torch.no_grad():
            for name, val in state.items():
                getattr(self, name).copy_(val)

    def tuned(self) -> "tuple[float, float] | None":
        """The tuned (max, min) ratios; None where none is tuned."""
        if not self.params():
            return None
        return tuple(float(p.detach().clamp(*self.RANGE)) if p is not None else 1.0
                     for p in (self.max_ratio, self.min_ratio))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.params():
            return act_qdq(x, self.scheme, self.amax, ratio=self.ratio)
        top = self.max_ratio.clamp(*self.RANGE) if self.max_ratio is not None else 1.0
        if not self.scheme.act_dynamic:  # a static scale: the ratio on the calibrated amax
            return act_qdq(x, self.scheme, self.amax * top)
        bottom = self.min_ratio.clamp(*self.RANGE) if self.min_ratio is not None else 1.0
        return act_qdq(x, self.scheme, self.amax, ratio=(top, bottom))


def install(module: nn.Module, scheme: QuantScheme, amax: torch.Tensor | None,
            ratio: "tuple[float, float] | None" = None) -> None:
    """Quantize ``module``'s input on every call (replaces a hook installed before); no-op for A16 schemes.
    ``ratio``: a dynamic scale's tuned (max, min) clip ratios."""
    remove(module)
    if not quantizes_acts(scheme):
        return
    quant = ActQuantizer(scheme, amax, ratio=ratio)

    def hook(_mod: nn.Module, args: tuple[Any, ...]):
        return (quant(args[0]), *args[1:])

    setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(hook))


def remove(module: nn.Module) -> None:
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK_ATTR)
