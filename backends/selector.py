"""Per-layer kernel selection: an ordered candidate list, each kernel answers ``can_implement(spec)``.

A failure lists every kernel with the reason it was rejected.  Kernels are declared with what they
support; ``backend="auto"`` takes the highest-priority kernel that fits, an explicit name forces one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from autoround.quantizer.errors import BackendError


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel must know about one quantized linear layer to decide whether it can run it."""

    device: str  # "cpu", "cuda", "xpu", "hpu"
    bits: int
    group_size: int
    sym: bool
    packing_format: str
    in_features: int
    out_features: int
    act_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class KernelInfo:
    name: str
    priority: int
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    packing_formats: tuple[str, ...]
    factory: Callable[..., torch.nn.Module]
    group_sizes: tuple[int, ...] | None = None  # None = any
    sym: tuple[bool, ...] = (True, False)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    requires: tuple[str, ...] = ()  # importable module names

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        if spec.device not in self.devices:
            return False, f"device {spec.device!r} not in {self.devices}"
        if spec.bits not in self.bits:
            return False, f"{spec.bits}-bit not supported (supports {self.bits})"
        if self.group_sizes is not None and spec.group_size not in self.group_sizes:
            return False, f"group_size {spec.group_size} not supported (supports {self.group_sizes})"
        if spec.sym not in self.sym:
            return False, f"{'symmetric' if spec.sym else 'asymmetric'} weights not supported"
        if spec.packing_format not in self.packing_formats:
            return False, f"packing {spec.packing_format!r} not supported (supports {self.packing_formats})"
        if spec.act_dtype not in self.dtypes:
            return False, f"activation dtype {spec.act_dtype} not supported"
        missing = [m for m in self.requires if not _importable(m)]
        if missing:
            return False, f"missing package(s): {', '.join(missing)}"
        return True, "ok"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_KERNELS: list[KernelInfo] = []


def register_kernel(info: KernelInfo) -> None:
    _KERNELS.append(info)
    _KERNELS.sort(key=lambda k: -k.priority)


def kernels() -> list[KernelInfo]:
    return list(_KERNELS)


def select_kernel(spec: LayerSpec, backend: str = "auto") -> KernelInfo:
    """The kernel for ``spec``: the best that fits (``auto``) or the named one; raises with all reasons."""
    names = [k.name for k in _KERNELS]
    if backend != "auto":
        chosen = [k for k in _KERNELS if k.name == backend]
        if not chosen:
            raise BackendError(f"unknown backend {backend!r}; valid: auto, {', '.join(names)}")
        ok, reason = chosen[0].can_implement(spec)
        if not ok:
            raise BackendError(f"backend {backend!r} cannot run this layer ({_describe(spec)}): {reason}")
        return chosen[0]
    reasons = []
    for k in _KERNELS:
        ok, reason = k.can_implement(spec)
        if ok:
            return k
        reasons.append(f"  {k.name}: {reason}")
    raise BackendError(f"no kernel can run this layer ({_describe(spec)}):\n" + "\n".join(reasons))


def _describe(spec: LayerSpec) -> str:
    return (
        f"{spec.device}, {spec.bits}-bit, group {spec.group_size}, {'sym' if spec.sym else 'asym'}, "
        f"{spec.packing_format}, [{spec.out_features} x {spec.in_features}], {spec.act_dtype}"
    )
