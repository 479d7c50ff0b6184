"""autoround: SignRound low-bit weight quantization with checkpoints that transformers, vLLM and SGLang serve.

``from autoround import AutoRound, AutoRoundConfig, AutoScheme``.  Importing the package registers the
transformers integration, so ``AutoModelForCausalLM.from_pretrained(ckpt)`` of any AutoRound checkpoint
loads through this project's kernels: at once when transformers is already imported, otherwise the moment
it is (``transformers_hook``), so that ``import autoround.quantizer.qmath`` alone does not import transformers.
The public classes are imported on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import envs
from .log import logger
from .transformers_hook import register_when_imported

try:
    __version__ = version("autoround")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

_LAZY = {
    "AutoRound": "api",
    "AutoScheme": "api",
    "AutoRoundConfig": "transformers_integration",
    "AutoRoundQuantizer": "transformers_integration",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoround' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


register_when_imported()

__all__ = ["AutoRound", "AutoRoundConfig", "AutoRoundQuantizer", "AutoScheme", "envs", "logger", "__version__"]
