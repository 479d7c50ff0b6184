"""Per-layer kernel selection: an ordered candidate list, each kernel answers ``can_implement(spec)``.

- ``LayerSpec`` (frozen) says what one quantized linear layer needs: device type, bits, group size, sym,
  packing format, shape, activation dtype, activation bits.
- ``KernelInfo`` declares what a kernel supports: devices, bits, group sizes, sym, packing formats,
  dtypes, activation bits, shape constraints, required packages (pip requirement strings with versions),
  runtime checks (a CPU feature, a compiler, a torch op), a priority (higher wins) and aliases.
- ``select_kernel(spec, backend)``: ``"auto"`` takes the highest-priority kernel that fits; a name (or
  alias) forces it and raises with the reason when it cannot run the layer; when nothing fits, one
  ``BackendError`` lists every kernel with its reason.
- ``InstallAdvice``: pass one per model to ``select_kernel``; it collects higher-priority kernels that
  would have fitted but lack a package, and ``emit()`` logs ONE warning per model naming the
  ``pip install`` that enables them.
- A kernel may declare itself ``slow_on`` some hosts (``slow_reason``): ``auto`` skips it there (it is
  still correct and can be forced by name); the reason shows in the rejection list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from autoround.quantizer.errors import BackendError

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_ONLY_ACT_BITS = (16, 32)


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
    act_bits: int = 16
    # the weight family of the data-type registry: "int", "mx", "nvfp", "fp8" (a 2-D FP8 block group_size is
    # given as its (rows, cols) tuple)
    weight_family: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise BackendError(f"LayerSpec.device must be a device type such as 'cpu', got {self.device!r}")
        if self.bits <= 0 or self.in_features <= 0 or self.out_features <= 0:
            raise BackendError(f"LayerSpec needs positive bits and features, got {self}")
        if isinstance(self.group_size, tuple):
            if self.weight_family != "fp8":
                raise BackendError(f"LayerSpec.group_size {self.group_size} (2-D blocks) exists for FP8 weights only")
        elif self.group_size < -1:
            raise BackendError(f"LayerSpec.group_size must be -1, 0 or positive, got {self.group_size}")

    def describe(self) -> str:
        act = "" if self.act_bits >= 16 else f", act {self.act_bits}-bit"
        return (
            f"{self.device}, {self.bits}-bit, group {self.group_size}, {'sym' if self.sym else 'asym'}, "
            f"{self.packing_format}, [{self.out_features} x {self.in_features}], {self.act_dtype}{act}"
        )


def requirement_problem(requirement: str) -> str | None:
    """None when the pip requirement (e.g. ``"gptqmodel>=2.0"``) is installed, else what is wrong."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        return f"{req.name} is not installed"
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        return f"{req.name} {have} is installed but {requirement} is needed"
    return None


def pip_command(requirements: tuple[str, ...] | list[str]) -> str:
    return "pip install " + " ".join(f'"{r}"' for r in requirements)


@dataclass(frozen=True)
class KernelInfo:
    """A kernel's declaration.  ``factory`` builds a layer with ``TorchQuantLinear``'s constructor."""

    name: str
    priority: int
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    packing_formats: tuple[str, ...]
    factory: Callable[..., torch.nn.Module]
    group_sizes: tuple[int, ...] | None = None  # None = any
    sym: tuple[bool, ...] = (True, False)
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    act_bits: tuple[int, ...] = WEIGHT_ONLY_ACT_BITS
    # returns a reason when the layer's shape cannot run (e.g. "in_features % 32 != 0")
    shape_check: Callable[["LayerSpec"], str | None] | None = None
    # pip requirement strings with versions, checked against installed distributions
    requires: tuple[str, ...] = ()
    # host checks beyond packages (CPU features, a compiler, a torch op); returns a reason or None
    runtime_check: Callable[[], str | None] | None = None
    # a reason why ``auto`` should not pick this kernel on this host (still correct; can be forced)
    slow_reason: Callable[[], str | None] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    # the dtype the kernel computes in on its device when it converts internally (None = activation dtype)
    compute_dtype: torch.dtype | None = None
    weight_families: tuple[str, ...] = ("int",)

    def matches(self, backend: str) -> bool:
        return backend == self.name or backend in self.aliases

    def static_reason(self, spec: LayerSpec) -> str | None:
        """Why the declaration excludes this layer (packages and host checks aside); None when it fits."""
        if spec.weight_family not in self.weight_families:
            return f"{spec.weight_family} weights not supported (supports {', '.join(self.weight_families)})"
        if spec.device not in self.devices:
            return f"device {spec.device!r} not supported (supports {', '.join(self.devices)})"
        if spec.bits not in self.bits:
            return f"{spec.bits}-bit not supported (supports {', '.join(map(str, self.bits))})"
        if self.group_sizes is not None and spec.group_size not in self.group_sizes:
            return f"group_size {spec.group_size} not supported (supports {', '.join(map(str, self.group_sizes))})"
        if spec.sym not in self.sym:
            return f"{'symmetric' if spec.sym else 'asymmetric'} weights not supported"
        if spec.packing_format not in self.packing_formats:
            return f"packing {spec.packing_format!r} not supported (supports {', '.join(self.packing_formats)})"
        if spec.act_dtype not in self.dtypes:
            return f"activation dtype {spec.act_dtype} not supported (supports {', '.join(map(str, self.dtypes))})"
        if spec.act_bits not in self.act_bits:
            return f"{spec.act_bits}-bit activations not supported"
        if self.shape_check is not None:
            reason = self.shape_check(spec)
            if reason:
                return reason
        return None

    def missing_requirements(self) -> list[str]:
        return [r for r in self.requires if requirement_problem(r)]

    def requirement_reason(self) -> str | None:
        problems = [p for p in (requirement_problem(r) for r in self.requires) if p]
        if problems:
            return f"{'; '.join(problems)} (enable with `{pip_command(self.missing_requirements())}`)"
        return None

    def host_reason(self) -> str | None:
        return self.runtime_check() if self.runtime_check is not None else None

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        reason = self.static_reason(spec) or self.requirement_reason() or self.host_reason()
        return (False, reason) if reason else (True, "ok")


_KERNELS: list[KernelInfo] = []


def register_kernel(info: KernelInfo) -> None:
    """Add a kernel (replacing one of the same name); candidates stay sorted by priority, stable.  Its
    ``factory`` must be a subclass of ``TorchQuantLinear``, the kernel base class."""
    from .torch_kernel import TorchQuantLinear

    if not (isinstance(info.factory, type) and issubclass(info.factory, TorchQuantLinear)):
        raise TypeError(
            f"kernel {info.name!r}: factory {info.factory!r} must be a subclass of "
            "autoround.backends.TorchQuantLinear (the kernel base class)"
        )
    global _KERNELS
    kept = [k for k in _KERNELS if k.name != info.name]
    kept.append(info)
    _KERNELS = sorted(kept, key=lambda k: -k.priority)


def unregister_kernel(name: str) -> KernelInfo | None:
    """Remove a kernel by name (returns it, or None when absent)."""
    global _KERNELS
    found = next((k for k in _KERNELS if k.name == name), None)
    _KERNELS = [k for k in _KERNELS if k.name != name]
    return found


def kernels() -> list[KernelInfo]:
    return list(_KERNELS)


def backend_names() -> list[str]:
    """Every name ``backend=`` accepts: ``auto``, kernel names and aliases."""
    names = ["auto"]
    for k in _KERNELS:
        for n in (k.name, *k.aliases):
            if n not in names:
                names.append(n)
    return names


@dataclass
class InstallAdvice:
    """Collects, over one model, better kernels that only lack packages; ``emit()`` warns once."""

    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kernel name -> missing requirements
    layers: dict[str, int] = field(default_factory=dict)
    emitted: bool = False

    def note(self, kernel: KernelInfo) -> None:
        self.missing.setdefault(kernel.name, tuple(kernel.missing_requirements()))
        self.layers[kernel.name] = self.layers.get(kernel.name, 0) + 1

    def message(self) -> str | None:
        if not self.missing:
            return None
        reqs: list[str] = []
        for r in self.missing.values():
            reqs += [x for x in r if x not in reqs]
        which = ", ".join(f"{name} ({self.layers[name]} layers)" for name in self.missing)
        return f"faster kernels would run this model but their packages are missing: {which}; `{pip_command(reqs)}` enables them"

    def emit(self) -> str | None:
        """Log the one warning (at most once); returns the message."""
        msg = self.message()
        if msg and not self.emitted:
            from autoround.log import logger

            logger.warning(msg)
            self.emitted = True
        return msg


def select_kernel(spec: LayerSpec, backend: str = "auto", advice: InstallAdvice | None = None) -> KernelInfo:
    """The kernel for ``spec``: the best that fits (``auto``) or the named one; raises with all reasons."""
    if backend != "auto":
        chosen = [k for k in _KERNELS if k.matches(backend)]
        if not chosen:
            raise BackendError(f"unknown backend {backend!r}; valid: {', '.join(backend_names())}")
        reasons = []
        for k in chosen:
            ok, reason = k.can_implement(spec)
            if ok:
                return k
            reasons.append(f"{k.name}: {reason}" if len(chosen) > 1 else reason)
        raise BackendError(
            f"backend {backend!r} cannot run this layer ({spec.describe()}): {'; '.join(reasons)}; "
            "use backend='auto' to pick one that can"
        )
    reasons = []
    lacking_packages: list[KernelInfo] = []
    for k in _KERNELS:
        reason = k.static_reason(spec)
        if reason is None and k.requirement_reason():
            lacking_packages.append(k)
            reason = k.requirement_reason()
        reason = reason or k.host_reason() or (k.slow_reason() if k.slow_reason else None)
        if reason is None:
            if advice is not None:
                for better in lacking_packages:
                    if better.priority > k.priority:
                        advice.note(better)
            return k
        reasons.append(f"  {k.name}: {reason}")
    raise BackendError(f"no kernel can run this layer ({spec.describe()}):\n" + "\n".join(reasons))


def _describe(spec: LayerSpec) -> str:  # kept for callers of the first version
    return spec.describe()
