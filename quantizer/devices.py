"""``device_map`` as the reference spells it, resolved to the one device this machine has for the run.

Accepted: ``None``/``"cpu"``; ``"auto"`` (the first accelerator present, else the CPU); a device name
(``"cuda:1"``, ``"xpu"``, ``"hpu"``, ``"mps"``); an index or a comma-separated list of indices (``0``, ``"0,1,2,3"``:
CUDA devices, XPU where there is no CUDA); a dict of module name -> device.  Every device named must exist here,
else one error says which do not and what this machine has.  Placing one model across several devices is not built
yet: a list or dict that names more than one device is refused with that reason.
"""

from __future__ import annotations

from typing import Any

import torch

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


def resolve_device_map(device_map: Any) -> torch.device:
    """The device the run's model goes to, checked before any work (see the module's docstring)."""
    if device_map is None or device_map == "":
        return torch.device("cpu")
    if isinstance(device_map, dict):
        if not device_map:
            return torch.device("cpu")
        devices = [_one(v, device_map) for v in device_map.values()]
    elif isinstance(device_map, (list, tuple)):
        devices = [_one(v, device_map) for v in device_map]
    elif isinstance(device_map, str) and "," in device_map:
        devices = [_one(v, device_map) for v in device_map.split(",") if v.strip()]
    else:
        devices = [_one(device_map, device_map)]
    distinct = list(dict.fromkeys(str(d) for d in devices))
    if len(distinct) > 1:
        raise AutoRoundError(
            f"device_map={device_map!r} spreads the run over {', '.join(distinct)}: placing one model across "
            f"several devices is not built yet; pass one device, e.g. device_map={distinct[0]!r}"
        )
    if devices[0].type == "meta":
        raise AutoRoundError(f"device_map={device_map!r}: the meta device holds no weights to quantize; use 'cpu' or 'auto'")
    return devices[0]
