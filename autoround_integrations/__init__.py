"""autoround: SignRound low-bit weight quantization with checkpoints that transformers, vLLM and SGLang serve.

``from autoround import AutoRound, AutoRoundConfig, AutoScheme``.  Importing the package registers the
transformers integration, so ``AutoModelForCausalLM.from_pretrained(ckpt)`` of any AutoRound checkpoint
loads through this project's kernels.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import envs
from .log import logger

try:
    __version__ = version("autoround")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

from .transformers_integration import AutoRoundConfig, AutoRoundQuantizer, register as _register_transformers

_register_transformers()

from .api import AutoRound, AutoScheme  # noqa: E402

__all__ = ["AutoRound", "AutoRoundConfig", "AutoRoundQuantizer", "AutoScheme", "envs", "logger", "__version__"]
