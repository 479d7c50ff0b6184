"""Activation quantization (schemes with ``act_bits`` < 16): the inputs of a quantized linear layer are
quantized and dequantized before its matmul, in SignRound's tuned block (straight-through gradient) and in the
quantized model in memory (a forward pre-hook), so that the loss being tuned and the perplexity reported both see
what a W4A4 / W8A8 kernel computes.  The activations' data type does the math (``WeightFamily.act_quantize``).

Static schemes (``act_dynamic=False``, FP8_STATIC) and NVFP4's activation global scale need one number per layer
from the calibration data: the largest |input| seen (``needs_amax``), measured by ``importance.ImportanceHooks``
on the float path and kept on the exported layer (``QuantizedLayer.input_amax``) for the formats that write it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dtypes import family_of
from .errors import AutoRoundError
from .schemes import QuantScheme
from .. import envs

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


def check_env(schemes: "list[QuantScheme]") -> None:
    """``AR_ACT_SCALE`` scales calibrated activation ranges: refuse it where no layer has one."""
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
            global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., features] quantized and dequantized as ``scheme``'s activations, in ``x``'s dtype;
    ``global_scale``: NVFP4's activation global scale as a checkpoint stores it (instead of one from ``amax``)."""
    act = scheme.act_scheme()
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    out = family_of(act).act_quantize(x2, act, amax if needs_amax(scheme) else None, global_scale=global_scale)
    return out.reshape(x.shape).to(x.dtype)


class ActQuantizer:
    """A callable ``x -> act_qdq(x, scheme, amax)`` (what a tuner applies to its input)."""

    def __init__(self, scheme: QuantScheme, amax: torch.Tensor | None) -> None:
        if needs_amax(scheme) and amax is None:
            raise ValueError(f"{scheme.describe()}: static activation quantization needs the calibrated input amax")
        self.scheme, self.amax = scheme, amax

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return act_qdq(x, self.scheme, self.amax)


def install(module: nn.Module, scheme: QuantScheme, amax: torch.Tensor | None) -> None:
    """Quantize ``module``'s input on every call (replaces a hook installed before); no-op for A16 schemes."""
    remove(module)
    if not quantizes_acts(scheme):
        return
    quant = ActQuantizer(scheme, amax)

    def hook(_mod: nn.Module, args: tuple[Any, ...]):
        return (quant(args[0]), *args[1:])

    setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(hook))


def remove(module: nn.Module) -> None:
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK_ATTR)
