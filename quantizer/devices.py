"""``device_map`` as the reference spells it: where the run's blocks are tuned, on one device or several.

Accepted: ``None``/``"cpu"``; ``"auto"`` (every accelerator of the first kind present, else the CPU); a device name
(``"cuda:1"``, ``"xpu"``, ``"hpu"``, ``"mps"``); an index or a comma-separated list of indices (``0``, ``"0,1,2,3"``:
CUDA devices, XPU where there is no CUDA); a dict of layer name (or regular expression) -> device.  Every device
named must exist here, else one error says which do not and what this machine has.

One device: the whole model goes there, except under streamed tuning on an accelerator (``Placement.host``), where the
model stays in host memory and each block visits the device for its turn as below.  Several
(``Placement.several``): the model stays in host memory, the
modules outside the blocks (embeddings, final norm, lm_head) go to the main device, and each block, when the loop
reaches it, goes to the main device with its quantized layers spread over the devices (``placed``): a list or
``"auto"`` splits a block's layers in order into runs of about equal weight bytes, one per device; a dict sends
each layer to the device of the first key that matches it.  A layer runs on its device behind accelerate's
``AlignDevicesHook`` (inputs moved there, output moved back); the block's other modules, the cached activations
and the loss stay on the main device, and the block goes back to host memory once it is done.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import AutoRoundError

_ACCELERATORS = ("cuda", "xpu", "hpu", "mps")


def _count(kind: str) -> int:
    if kind in ("cpu", "meta"):  # meta: always present (placement is tested with it), holds no weights
        return 1
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return int(backend is not None and backend.is_available())
    module = getattr(torch, kind, None)
    if module is None or not hasattr(module, "device_count"):
        return 0
    try:
        return int(module.device_count()) if module.is_available() else 0
    except Exception:  # a backend module that is present but cannot initialise has no devices
        return 0


def available() -> str:
    """What this machine has, in words: 'cpu, cuda:0, cuda:1'."""
    names = ["cpu"]
    for kind in _ACCELERATORS:
        n = _count(kind)
        names += [kind] if kind in ("mps", "hpu") and n == 1 else [f"{kind}:{i}" for i in range(n)]
    return ", ".join(names)


def _index_kind() -> str:
    """What a bare index means here: CUDA, or XPU on a machine with XPUs and no CUDA device."""
    return "xpu" if _count("cuda") == 0 and _count("xpu") > 0 else "cuda"


def _one(value: Any, original: Any) -> torch.device:
    if isinstance(value, torch.device):
        text = str(value)
    elif isinstance(value, bool):
        raise AutoRoundError(f"device_map={original!r} is not a device; use e.g. 'cpu', 'cuda:0', '0,1' or 'auto'")
    elif isinstance(value, int):
        text = f"{_index_kind()}:{value}"
    else:
        text = str(value).strip().lower()
        if text.isdigit():
            text = f"{_index_kind()}:{int(text)}"
    if text == "auto":
        for kind in _ACCELERATORS:
            if _count(kind):
                return torch.device(kind, 0) if kind not in ("mps", "hpu") else torch.device(kind)
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise AutoRoundError(
            f"device_map={original!r}: {text!r} is not a device; use e.g. 'cpu', 'cuda:0', '0,1' or 'auto' "
            f"(this machine has: {available()})"
        ) from None
    if device.type != "cpu":
        n = _count(device.type)
        index = device.index or 0
        if index >= n:
            raise AutoRoundError(
                f"device_map={original!r} names {device.type}:{index}, which this machine does not have "
                f"(it has: {available()}); use 'cpu' or 'auto'"
            )
    return device


def _all_of_first_accelerator() -> list[torch.device]:
    for kind in _ACCELERATORS:
        n = _count(kind)
        if n:
            return [torch.device(kind)] if kind in ("mps", "hpu") else [torch.device(kind, i) for i in range(n)]
    return [torch.device("cpu")]


def _main_of(devices: list[torch.device]) -> torch.device:
    """The main device of a dict: the lowest-numbered accelerator it names, else the CPU."""
    accel = [d for d in devices if d.type != "cpu"]
    return min(accel, key=lambda d: (d.type, d.index or 0)) if accel else torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where a run's blocks are tuned (see the module's docstring).  ``device``: the main device; ``devices``:
    every device the run uses, the main one first; ``rules``: a dict's (pattern, device) pairs in its order;
    ``spread``: a list or ``"auto"`` spreading each block's layers over ``devices``."""

    device: torch.device
    devices: tuple[torch.device, ...]
    rules: tuple[tuple[str, torch.device], ...] = ()
    spread: bool = False
    # the model stays in host memory and each block goes to ``device`` for its turn (streamed tuning on an
    # accelerator); implied by several devices
    host: bool = False

    @property
    def several(self) -> bool:
        return len(self.devices) > 1

    @property
    def in_host(self) -> bool:
        """Whether the model stays in host memory and the blocks (and the modules outside them) visit the
        device(s) for the block loop."""
        return self.several or self.host

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.devices)

    def matching(self, *names: str) -> torch.device | None:
        """The device of the first rule whose pattern matches one of ``names`` (a layer's name relative to its
        block, and its full name) from its start up to a dot or its end."""
        for pattern, device in self.rules:
            if any(_matches(pattern, name) for name in names):
                return device
        return None

    def assign(self, block_name: str, block: nn.Module, layers: Iterable[str]) -> dict[str, torch.device]:
        """Layer (name relative to ``block``) -> the device it is tuned on, for every layer of ``layers``."""
        layers = list(layers)
        if not self.several:
            return {rel: self.device for rel in layers}
        if not self.spread:
            return {rel: self.matching(rel, f"{block_name}.{rel}") or self.device for rel in layers}
        sizes = [sum(t.numel() * t.element_size() for t in block.get_submodule(rel).parameters()) for rel in layers]
        total, done, out = max(sum(sizes), 1), 0, {}
        n = len(self.devices)
        for rel, size in zip(layers, sizes):
            # the layer goes to the device whose equal share of the block's bytes holds the layer's middle byte
            out[rel] = self.devices[min(n - 1, int((done + size / 2) * n // total))]
            done += size
        return out

    def unmatched(self, names: Iterable[str], block_names: Iterable[str]) -> list[str]:
        """The rule patterns that match none of ``names`` (full names of the quantized layers inside the blocks of
        the block lists ``block_names``, e.g. "model.layers")."""
        prefixes = tuple(f"{b}." for b in block_names)

        def relative(name: str) -> str:  # "model.layers.3.mlp.up_proj" -> "mlp.up_proj"
            inside = next((name[len(p):] for p in prefixes if name.startswith(p)), None)
            return inside.partition(".")[2] if inside is not None else name

        pairs = [(name, relative(name)) for name in names]
        return [pattern for pattern, _ in self.rules
                if not any(_matches(pattern, full) or _matches(pattern, rel) for full, rel in pairs)]


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or re.match(f"(?:{pattern})(?:\\.|$)", name) is not None


SINGLE_DEVICE = Placement(torch.device("cpu"), (torch.device("cpu"),))  # one device: ``placed`` does nothing


def _pattern_ok(pattern: str, original: Any) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AutoRoundError(f"device_map={original!r}: key {pattern!r} is not a regular expression ({exc})") from None
    return pattern


def resolve_placement(device_map: Any) -> Placement:
    """Where the run's blocks are tuned, checked before any work (see the module's docstring)."""
    if device_map is None or device_map == "" or (isinstance(device_map, dict) and not device_map):
        return SINGLE_DEVICE
    rules: list[tuple[str, torch.device]] = []
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise AutoRoundError(f"device_map={device_map!r}: key {key!r} is not a layer name")
            rules.append((_pattern_ok(key, device_map), _one(value, device_map)))
        devices = [d for _, d in rules]
    elif isinstance(device_map, (list, tuple)):
        devices = [_one(v, device_map) for v in device_map]
    elif isinstance(device_map, str) and "," in device_map:
        devices = [_one(v, device_map) for v in device_map.split(",") if v.strip()]
    elif isinstance(device_map, str) and device_map.strip().lower() == "auto":
        devices = _all_of_first_accelerator()
    else:
        devices = [_one(device_map, device_map)]
    if any(d.type == "meta" for d in devices):
        raise AutoRoundError(f"device_map={device_map!r}: the meta device holds no weights to quantize; use 'cpu' or 'auto'")
    distinct = list(dict.fromkeys(devices))
    main = _main_of(distinct) if rules else distinct[0]
    ordered = (main, *[d for d in distinct if d != main])
    if len(ordered) == 1:
        return Placement(main, ordered)
    return Placement(main, ordered, tuple(rules), spread=not rules)


def resolve_device_map(device_map: Any) -> torch.device:
    """The main device of ``device_map`` (``resolve_placement``)."""
    return resolve_placement(device_map).device


def place_outside_blocks(model: nn.Module, block_names: Iterable[str], device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that lies outside the blocks to ``device``."""
    _move_except(model, list(block_names), device)


def _move_except(root: nn.Module, skipped: list[str], device: torch.device) -> None:
    """Every parameter and buffer of ``root`` outside the submodules ``skipped`` (names relative to ``root``) to
    ``device``, as ``nn.Module.to`` moves them: a parameter keeps its identity where the devices allow it, so
    weights tied across modules stay tied."""
    for name, module in root.named_modules():
        if not any(name == s or name.startswith(s + ".") for s in skipped):
            module._apply(lambda t: t.to(device), recurse=False)


@contextmanager
def outside_blocks_on(placement: Placement, model: nn.Module, block_names: Iterable[str]) -> Iterator[None]:
    """With the model in host memory (``Placement.in_host``): the modules outside the blocks on the main device for
    the duration (the block loop runs the embeddings there, and tunes lm_head there), then back in host memory.
    Nothing when the whole model is on its device already."""
    if not placement.in_host:
        yield
        return
    block_names = list(block_names)
    place_outside_blocks(model, block_names, placement.device)
    try:
        yield
    finally:
        place_outside_blocks(model, block_names, torch.device("cpu"))


@contextmanager
def placed(placement: Placement, block_name: str, block: nn.Module, layers: Iterable[str]) -> Iterator[dict]:
    """``block`` on the main device with ``layers`` on their devices (``Placement.assign``) for the duration;
    then back where it was.  One device in host mode (``Placement.host``): the block goes there whole.  Nothing
    happens when the whole model is on its device already.  Yields the assignment."""
    if not placement.in_host:
        yield {}
        return
    if not placement.several:
        home = next(block.parameters()).device
        block.to(placement.device)
        try:
            yield {rel: placement.device for rel in layers}
        finally:
            block.to(home)
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    home = next(block.parameters()).device
    where = placement.assign(block_name, block, layers)
    hooked = []
    try:
        for rel, device in where.items():  # each layer straight to its device: the block is never whole on one
            module = block.get_submodule(rel)
            module.to(device)
            add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=True))
            hooked.append(module)
        _move_except(block, list(where), placement.device)
        yield where
    finally:
        for module in hooked:
            remove_hook_from_module(module)
        block.to(home)


def carry_placement(old: nn.Module, new: nn.Module) -> None:
    """``new`` replaces ``old`` in a placed block: it runs on ``old``'s device (when ``new`` has no placement of its
    own), and ``old``, when it had its own, gives it up (a tuning wrapper swapped back for its layer)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    hook = getattr(old, "_hf_hook", None)
    if hook is None:
        return
    if getattr(new, "_hf_hook", None) is None:
        add_hook_to_module(new, AlignDevicesHook(execution_device=hook.execution_device, io_same_device=True))
    else:
        remove_hook_from_module(old)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (inside dataclasses, dicts, lists and tuples) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: to_device(getattr(obj, f.name), device) for f in fields(obj) if f.init}
        changed = {k: v for k, v in moved.items() if v is not getattr(obj, k)}
        return replace(obj, **changed) if changed else obj
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
