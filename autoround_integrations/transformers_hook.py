"""Register the transformers integration when transformers is imported, without importing it ourselves.

``import autoround`` must make ``AutoModelForCausalLM.from_pretrained(ckpt)`` of our checkpoints load through
this project, yet importing a low-level module (``autoround.quantizer.qmath``, ``autoround.backends``) must not
import transformers.  So: if transformers is already imported, register now; otherwise a one-shot finder on
``sys.meta_path`` wraps transformers' own loader and registers right after ``transformers/__init__`` ran.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any


def _register() -> None:
    name = f"{__package__}.transformers_integration"
    loading = sys.modules.get(name)
    if loading is not None and not hasattr(loading, "register"):
        return  # that module is importing transformers right now; it registers itself when it is done
    from .transformers_integration import register

    register()


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001 - importlib's protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        _register()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for ``transformers`` and wraps the loader they return."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname != "transformers":
            return None
        _uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


_FINDER = _TransformersFinder()


def _uninstall() -> None:
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_when_imported() -> None:
    if "transformers" in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
