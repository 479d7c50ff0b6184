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
from ..log import logger


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
    for name in tqdm(list(plan.quantize), desc="quantizing layers", leave=False):
        module, scheme = linears[name], plan.quantize[name]
        w = module.weight.data
        imp = None if importance is None or name not in importance else importance[name]
        qw = family_of(scheme).quantize(w, scheme, imp, search_lowest)
        module.weight.data.copy_(qw.dequantize().to(w.dtype))
        bias = module.bias.data.clone() if module.bias is not None else None
        amax = (input_amax or {}).get(name)
        act_quant.install(module, scheme, amax)
        out[name] = QuantizedLayer(name, scheme, qw, bias, module.in_features, module.out_features, amax)
    logger.info("quantized %d layers in %.1fs", len(out), time.time() - start)
    return out
