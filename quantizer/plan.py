"""The plan stage: which scheme each quantizable layer gets (``layer_config`` overrides, the data type's shape
fallbacks, what the chosen formats can pack) and which layers stay float, with the reason logged."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from .errors import AutoRoundError, FormatError, SchemeError
from .formats import ExportFormat, formats_supporting, list_formats
from .dtypes import family_of
from .qmath import ROUND_WITH_COMPUTED
from .schemes import QuantScheme, resolve_scheme
from ..log import logger


def _match(key: str, name: str) -> bool:
    if key == name:
        return True
    try:
        if re.fullmatch(key, name) or re.search(key, name):
            return True
    except re.error:
        pass
    return key in name


def layer_config_entry(name: str, layer_config: Mapping[str, Any] | None) -> Any:
    """The ``layer_config`` entry that applies to layer ``name`` (exact name, then regex / substring keys in the
    order given), or None."""
    if not layer_config:
        return None
    entry = layer_config.get(name)
    if entry is None:
        for key, val in layer_config.items():
            if _match(key, name):
                return val
    return entry


def scheme_for_layer(
    name: str, default: QuantScheme, layer_config: Mapping[str, Any] | None
) -> QuantScheme:
    """Exact name first, then regex / fuzzy (substring) keys in the order given."""
    entry = layer_config_entry(name, layer_config)
    if entry is None:
        return default
    if isinstance(entry, (str, QuantScheme)):
        return resolve_scheme(entry)
    if isinstance(entry, Mapping):
        entry = dict(entry)
        base = entry.pop("scheme", None)
        base_scheme = resolve_scheme(base) if base is not None else default
        try:
            return base_scheme.replace(**entry)
        except SchemeError as exc:
            raise SchemeError(f"layer_config[{name!r}]: {exc}") from None
    raise SchemeError(f"layer_config[{name!r}] must be a dict like {{'bits': 8}} or a scheme name, got {entry!r}")


@dataclass
class LayerPlan:
    quantize: dict[str, QuantScheme] = field(default_factory=dict)
    keep_float: list[str] = field(default_factory=list)
    # the scale plain RTN rounds integers with: the (first) format's ``rtn_rounding``
    rtn_rounding: str = ROUND_WITH_COMPUTED


def plan_layers(
    linears: Mapping[str, nn.Linear],
    default: QuantScheme,
    layer_config: Mapping[str, Any] | None,
    formats: list[ExportFormat],
    ignore_layers: list[str] | None = None,
    lm_head: str | None = None,
    lm_head_tied: bool = False,
) -> LayerPlan:
    """Decide each layer's scheme; fail (before any work) when a format cannot hold a scheme.

    ``lm_head``: the name of the output projection when it is to be quantized (it is in ``linears``);
    ``lm_head_tied``: whether the model ties it to the input embedding."""
    plan = LayerPlan(rtn_rounding=formats[0].rtn_rounding if formats else ROUND_WITH_COMPUTED)
    rules = {f.rtn_rounding for f in formats}
    if len(rules) > 1:
        logger.info("plain RTN rounds with the %s scale, as %s is written (formats differ: %s)", plan.rtn_rounding,
                    formats[0].name, ", ".join(f"{f.name}: {f.rtn_rounding}" for f in formats))
    bases = layer_bases(linears, default)
    for name, module in linears.items():
        scheme = scheme_for_layer(name, bases.get(name, default), layer_config)
        if not scheme.is_float:  # the family's fallback when the shape does not fit (GGUF k-quants, say)
            scheme = family_of(scheme).fit(name, scheme, module.in_features)
        if ignore_layers and any(_match(k, name) for k in ignore_layers):
            scheme = resolve_scheme("BF16")
        if scheme.is_float:
            plan.keep_float.append(name)
            continue
        for fmt in formats:
            err = fmt.scheme_error(scheme)
            if err:
                able = formats_supporting(scheme)
                hint = f"; formats that can hold {scheme.describe()}: {', '.join(able)}" if able else ""
                raise SchemeError(
                    f"format {fmt.name!r} cannot store layer {name} ({scheme.describe()}): {err}{hint}"
                )
        shape_errs = [e for f in formats if (e := f.shape_error(scheme, module.in_features, module.out_features))]
        if shape_errs:
            logger.warning("keeping %s in float: %s", name, shape_errs[0])
            plan.keep_float.append(name)
            continue
        plan.quantize[name] = scheme
    if lm_head is not None and lm_head in plan.quantize:
        _check_lm_head(formats, lm_head_tied)
    for fmt in formats:
        mix = fmt.mix_error(list(set(plan.quantize.values())))
        if mix:
            raise FormatError(mix)
        if fmt.uniform and len(set(plan.quantize.values())) > 1:
            kinds = sorted({s.describe() for s in plan.quantize.values()})
            raise FormatError(
                f"format {fmt.name!r} holds one scheme for every quantized layer, but this run mixes "
                f"{', '.join(kinds)}; drop the per-layer overrides (bits 16 to keep a layer in float is fine) "
                "or choose a format with per-layer overrides such as auto_round or auto_gptq"
            )
    if not plan.quantize:
        raise AutoRoundError("no layer is left to quantize: every layer was kept in float by layer_config or its shape")
    return plan


def fitted_scheme(name: str, module: nn.Module, scheme: QuantScheme, formats: list[ExportFormat]) -> QuantScheme:
    """``scheme`` as layer ``name`` gets it: after its family's shape fallback, and float when a format cannot
    pack the shape (``plan_layers``' rules for one layer; the format's ``scheme_error`` is checked elsewhere)."""
    if scheme.is_float:
        return scheme
    scheme = family_of(scheme).fit(name, scheme, module.in_features)
    if any(f.shape_error(scheme, module.in_features, module.out_features) for f in formats):
        return resolve_scheme("BF16")
    return scheme


def _check_lm_head(formats: list[ExportFormat], tied: bool) -> None:
    from .formats import get_format

    every = [get_format(n) for n in list_formats()]
    for fmt in formats:
        if not fmt.lm_head:
            able = [f.name for f in every if f.lm_head]
            raise FormatError(
                f"format {fmt.name!r} cannot hold a quantized lm_head; drop quant_lm_head or use one of: "
                f"{', '.join(able)}"
            )
        if tied and not fmt.tied_lm_head:
            able = [f.name for f in every if f.tied_lm_head]
            raise FormatError(
                f"this model ties lm_head to the input embedding and format {fmt.name!r} cannot hold a quantized "
                f"lm_head with a float embedding; drop quant_lm_head or use one of: {', '.join(able)}"
            )


def layer_bases(linears: Mapping[str, nn.Linear], default: QuantScheme) -> dict[str, QuantScheme]:
    """The per-layer schemes a model-level scheme expands into (a GGUF file type: llama.cpp's rules)."""
    if default.is_float:
        return {}
    shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    return family_of(default).layer_schemes(shapes, default)
