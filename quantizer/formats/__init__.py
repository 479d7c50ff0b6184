"""Export formats: one module per format behind one small protocol, registered by name.

This package is a leaf: kernels and integrations may import it (for the packing layouts and config keys);
it imports nothing from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol

import torch

from ..errors import FormatError
from ..qmath import QuantizedWeight
from ..schemes import QuantScheme


@dataclass
class QuantizedLayer:
    """One quantized linear layer ready for export."""

    name: str
    scheme: QuantScheme
    weight: QuantizedWeight
    bias: torch.Tensor | None
    in_features: int
    out_features: int


@dataclass
class ExportJob:
    """Everything a format needs to write a checkpoint."""

    model: Any  # transformers.PreTrainedModel holding float (or fake-quantized) weights
    layers: Mapping[str, QuantizedLayer]
    scheme: QuantScheme  # the default scheme; layers that differ go to per-layer overrides
    block_names: list[str]
    float_layers: list[str] = field(default_factory=list)  # quantizable layers deliberately kept in float
    tokenizer: Any = None
    settings: dict[str, Any] = field(default_factory=dict)  # tuning settings worth recording
    dtype: torch.dtype | None = None  # dtype of the float tensors in the checkpoint


class ExportFormat(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]

    def scheme_error(self, scheme: QuantScheme) -> str | None:
        """Why this format cannot hold ``scheme`` at all (checked before any work), or None."""

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        """Why a layer of this shape cannot be packed (the layer is then kept in float), or None."""

    def layer_tensors(self, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
        """Tensors replacing ``<name>.weight`` (suffix -> tensor), bias excluded."""

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        """The ``quantization_config`` dict for config.json."""

    def save(self, job: ExportJob, output_dir: str) -> str:
        """Write the checkpoint to ``output_dir`` atomically and return its path."""


_REGISTRY: dict[str, type] = {}


def register_format(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from . import auto_round  # noqa: F401  (registers itself)
    from . import gguf  # noqa: F401  (registers gguf:q4_0 ... gguf:q6_k, gguf:bf16, gguf:f16)


def list_formats() -> dict[str, str]:
    _load_builtin()
    return {name: cls.description for name, cls in _REGISTRY.items()}


def get_format(name: str) -> ExportFormat:
    _load_builtin()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise FormatError(f"unknown format {name!r}; valid formats: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]()


def parse_formats(spec: str | list[str]) -> list[ExportFormat]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise FormatError(f"no export format given; valid formats: {', '.join(list_formats())}")
    return [get_format(n) for n in dict.fromkeys(names)]
