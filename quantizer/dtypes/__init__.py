"""The data-type registry: one ``WeightFamily`` object per family of weight data types, found by a scheme's
``data_type``.

A family owns everything that depends on how a weight is represented:

- validation of a scheme of its data types (``validate``) and its one-line description (``describe``);
- the presets it adds to ``schemes.PRESETS`` (``presets``);
- planning: a model-level scheme that expands into per-layer schemes (``layer_schemes``, e.g. a llama.cpp
  file type) and a layer's fallback when its shape does not fit (``fit``);
- the storage a layer of its type takes (``storage_bits``: weight bits plus scales and zero points), which
  AutoScheme's bit budget counts;
- round-to-nearest and optimized RTN (``quantize``: importance None = plain RTN), which return the packed
  weight object the formats write (anything with ``dequantize()`` and ``bits``);
- SignRound: the tunable fake-quantizer that wraps a linear layer (``tuner``), whether the tuner needs an
  importance (``tuning_importance``), and whether that importance is measured in the float forward the targets
  need anyway (``float_forward_importance``).

The planner, the RTN stage, SignRound's block tuner and the resume store dispatch through ``family_of(scheme)``;
none of them knows the families.  Adding a data type (e.g. MXFP4) is one new module defining a ``WeightFamily``
subclass plus ``register_family(...)``; a format that can hold it says so in its ``scheme_error``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ..qmath import ROUND_WITH_COMPUTED

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..options import TuningOptions
    from ..schemes import QuantScheme


class WeightFamily:
    """Base class of a family of weight data types; subclasses override what differs."""

    name: ClassVar[str]
    # the class of the packed weights ``quantize`` and the tuners return (the resume store keeps them)
    weight_type: ClassVar[type]
    # the model-free route (plain RTN streamed from the files) can write this family's checkpoints
    model_free: ClassVar[bool] = False
    # weights carry a per-tensor global scale (NVFP4), which layers fused by the engines share (``global_amax``)
    has_global_scale: ClassVar[bool] = False
    # plain RTN's integers depend on the scale they are rounded with (``rtn_rounding``: the format's rule)
    rounds_by_format: ClassVar[bool] = False

    def data_types(self) -> tuple[str, ...]:
        """The ``data_type`` strings this family owns."""
        raise NotImplementedError

    def validate(self, scheme: "QuantScheme") -> None:
        """Raise ``SchemeError`` when ``scheme`` (of this family, not float) is impossible."""

    def describe(self, scheme: "QuantScheme") -> str:
        sym = "sym" if scheme.sym else "asym"
        return f"W{scheme.bits}A{scheme.act_bits} {scheme.data_type} group {scheme.group_size} {sym}"

    def type_name(self, scheme: "QuantScheme") -> str:
        """A short name of the scheme's type, for logs."""
        return scheme.data_type

    def presets(self) -> dict[str, "QuantScheme"]:
        return {}

    def layer_schemes(self, shapes: Mapping[str, tuple[int, int]], default: "QuantScheme") -> dict[str, "QuantScheme"]:
        """Per-layer schemes a model-level ``default`` of this family expands into (``{}``: every layer gets it).
        ``shapes``: layer name -> (out_features, in_features)."""
        return {}

    def fit(self, name: str, scheme: "QuantScheme", in_features: int) -> "QuantScheme":
        """The scheme a layer of ``in_features`` inputs actually gets (a fallback when the shape does not fit)."""
        return scheme

    def storage_bits(self, scheme: "QuantScheme", in_features: int, out_features: int,
                     with_metadata: bool = True) -> int:
        """Bits an ``[out_features, in_features]`` weight of ``scheme`` takes in a checkpoint: the weights, plus
        (``with_metadata``) the scales and zero points."""
        raise NotImplementedError(f"weight family {self.name!r} does not say how many bits its weights take")

    def quantize(self, weight: "torch.Tensor", scheme: "QuantScheme", importance: "torch.Tensor | None",
                 search_lowest: float = 0.7, global_amax: "torch.Tensor | None" = None,
                 rtn_rounding: str = ROUND_WITH_COMPUTED) -> Any:
        """RTN (``importance`` None) or optimized RTN of a ``[out, in]`` weight; returns the packed weight.
        ``search_lowest``: the lowest clip ratio / range the importance-weighted search tries.  ``global_amax``:
        the |weight| maximum a per-tensor global scale is taken from, when it is shared with fused siblings
        (NVFP4); types without a global scale ignore it.  ``rtn_rounding``: the scale plain RTN rounds integers
        with (``qmath.ROUNDING_SCALES``, the format's ``rtn_rounding``); types whose rounding does not depend on it
        ignore it."""
        raise NotImplementedError

    def tuning_importance(self, scheme: "QuantScheme", options: "TuningOptions") -> bool:
        """Whether SignRound's tuner of a layer of ``scheme`` needs the layer's input importance."""
        return False

    def float_forward_importance(self, scheme: "QuantScheme", options: "TuningOptions") -> bool:
        """Whether that importance is measured in the block's float forward (else on the tuning inputs)."""
        return False

    def tuner(self, linear: "nn.Linear", scheme: "QuantScheme", options: "TuningOptions",
              importance: "torch.Tensor | None", global_amax: "torch.Tensor | None" = None) -> "nn.Module | None":
        """A module that replaces ``linear`` while its block is tuned, or None when this scheme is not tunable
        (the layer then gets ``quantize`` with the importance).  The module has parameters ``v`` and
        ``factors()``, ``clamp_()``, ``state()``/``load()``, ``quantized()`` (the packed weight), a
        ``factor_range`` and a ``default_factor_lr_scale``, and a ``linear`` attribute (see ``integer``)."""
        return None

    def weight_state(self, weight: Any) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
        """A packed weight as tensors and JSON fields (default: the fields of a dataclass ``weight_type``)."""
        import torch

        tensors, fields = {}, {}
        for f in dataclasses.fields(weight):
            value = getattr(weight, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value.contiguous()
            else:
                fields[f.name] = list(value) if isinstance(value, tuple) else value
        return tensors, fields

    def weight_from_state(self, tensors: Mapping[str, "torch.Tensor"], fields: Mapping[str, Any]) -> Any:
        """The packed weight back from ``weight_state``'s tensors and fields."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return self.weight_type(**values, **tensors)


_FAMILIES: dict[str, WeightFamily] = {}
_BY_DATA_TYPE: dict[str, WeightFamily] = {}
_BUILTIN = ("integer", "gguf.family", "floats")
_loaded = False


def register_family(family: WeightFamily) -> WeightFamily:
    """Register ``family`` for its data types (a data type owned by another family is an error) and add its
    presets to ``schemes.PRESETS`` (at once, or when ``schemes`` finishes loading for the built-in ones)."""
    for dt in family.data_types():
        owner = _BY_DATA_TYPE.get(dt)
        if owner is not None and owner.name != family.name:
            raise ValueError(f"data type {dt!r} already belongs to weight family {owner.name!r}")
    _FAMILIES[family.name] = family
    for dt in family.data_types():
        _BY_DATA_TYPE[dt] = family
    schemes = sys.modules.get(f"{__package__.rsplit('.', 1)[0]}.schemes")
    if getattr(schemes, "PRESETS_COMPLETE", False):
        schemes.PRESETS.update(family.presets())
    return family


def unregister_family(name: str) -> None:
    """Remove a family (its presets stay out of ``schemes.PRESETS`` too)."""
    from ..schemes import PRESETS

    family = _FAMILIES[name]
    for key in list(family.presets()):  # built while the family still validates its schemes
        PRESETS.pop(key, None)
    del _FAMILIES[name]
    for dt in family.data_types():
        _BY_DATA_TYPE.pop(dt, None)


def load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN:
        importlib.import_module(f"{__name__}.{module}")


def data_types() -> tuple[str, ...]:
    load_builtin()
    return tuple(_BY_DATA_TYPE)


def families() -> dict[str, WeightFamily]:
    load_builtin()
    return dict(_FAMILIES)


def family_for(data_type: str) -> WeightFamily | None:
    load_builtin()
    return _BY_DATA_TYPE.get(data_type)


def family_of_weight(weight: Any) -> WeightFamily:
    """The family whose ``weight_type`` ``weight`` is."""
    load_builtin()
    for family in _FAMILIES.values():
        if isinstance(weight, family.weight_type):
            return family
    raise TypeError(f"{type(weight).__name__} is the packed weight of no registered weight family")


def family_of(scheme: "QuantScheme") -> WeightFamily:
    """The family of ``scheme``'s data type (every valid scheme has one)."""
    family = family_for(scheme.data_type)
    if family is None:
        from ..errors import SchemeError

        raise SchemeError(f"data_type={scheme.data_type!r} is not supported; valid: {', '.join(data_types())}")
    return family
