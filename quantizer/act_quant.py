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
from .schemes import QuantScheme

_HOOK_ATTR = "_autoround_act_hook"


def quantizes_acts(scheme: QuantScheme) -> bool:
    return not scheme.is_float and scheme.act_bits < 16


def needs_amax(scheme: QuantScheme) -> bool:
    """Whether the layer's activation quantization needs the calibrated input amax."""
    if not quantizes_acts(scheme):
        return False
    return not scheme.act_dynamic or family_of(scheme.act_scheme()).name == "nvfp"


def act_qdq(x: torch.Tensor, scheme: QuantScheme, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., features] quantized and dequantized as ``scheme``'s activations, in ``x``'s dtype."""
    act = scheme.act_scheme()
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    out = family_of(act).act_quantize(x2, act, amax if needs_amax(scheme) else None)
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
