"""The RTN stage: round-to-nearest or optimized RTN of every planned layer, through each layer's data type."""

from __future__ import annotations

import time
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import act_quant
from .dtypes import family_of
from .formats import QuantizedLayer
from .plan import LayerPlan
from .schemes import QuantScheme
from .. import envs
from ..log import logger


def shared_global_amax(linears: Mapping[str, nn.Module], schemes: Mapping[str, QuantScheme]) -> dict[str, dict]:
    """The ``global_amax`` keyword of each layer with a per-tensor global scale (NVFP4) whose scale is shared:
    layers that engines fuse (q/k/v, gate/up) get one global scale, from the largest |weight| of them, because the
    fused layer has one (``AR_NVFP4_FUSED_LAYER_GLOBAL_SCALE``, on by default, as the reference tool).  Callers
    pass ``**shared.get(name, {})`` to the family's ``quantize`` / ``tuner``, so families without a global scale
    never see the keyword."""
    if not envs.AR_NVFP4_FUSED_LAYER_GLOBAL_SCALE:
        return {}
    from .autoscheme import fused_siblings

    scaled = [n for n, s in schemes.items() if not s.is_float and family_of(s).has_global_scale]
    out: dict[str, dict] = {}
    for group in fused_siblings(scaled):
        # (the layers may sit on different devices: ``devices.placed``)
        amax = max(linears[n].weight.detach().abs().amax().float().cpu() for n in group)
        out.update({n: {"global_amax": amax.to(linears[n].weight.device)} for n in group})
    return out


@torch.no_grad()
def quantize_layers(
    linears: Mapping[str, nn.Linear],
    plan: LayerPlan,
    importance: Mapping[str, torch.Tensor] | None,
    search_lowest: float,
    input_amax: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedLayer]:
    """RTN (``importance`` None) or optimized RTN each planned layer; weights become their dequantized
    values in place, and layers that quantize their activations get the hook that does it (``input_amax``: the
    calibrated amax of static ones), so the model in memory is the fake-quantized model."""
    out: dict[str, QuantizedLayer] = {}
    start = time.time()
    shared = shared_global_amax(linears, plan.quantize)
    for name in tqdm(list(plan.quantize), desc="quantizing layers", leave=False):
        module, scheme = linears[name], plan.quantize[name]
        w = module.weight.data
        imp = None if importance is None or name not in importance else importance[name].to(w.device)
        qw = family_of(scheme).quantize(w, scheme, imp, search_lowest, rtn_rounding=plan.rtn_rounding,
                                        **shared.get(name, {}))
        module.weight.data.copy_(qw.dequantize().to(w.dtype))
        bias = module.bias.data.clone() if module.bias is not None else None
        amax = (input_amax or {}).get(name)
        act_quant.install(module, scheme, amax)
        out[name] = QuantizedLayer(name, scheme, qw, bias, module.in_features, module.out_features, amax)
    logger.info("quantized %d layers in %.1fs", len(out), time.time() - start)
    return out
