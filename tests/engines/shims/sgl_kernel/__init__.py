"""Test-only stand-in for ``sgl_kernel`` (never installed, never part of the package).

SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) imports names from ``sgl_kernel`` and its submodules at module
level, and PyPI ships no CPU build of that package.  This shim makes those imports succeed; every name it hands
out is a function that raises if called, so a real use of a kernel fails loudly instead of computing anything.
The SGLang engine tests put this folder on PYTHONPATH for the engine subprocess only, and set
``SGL_KERNEL_SHIM_CALLS`` to a file in which every call is recorded (processes SGLang spawns inherit both)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

__version__ = "0.0.0+shim"
SHIM = True


def _stub(name: str):
    def call(*args, **kwargs):
        record = os.environ.get("SGL_KERNEL_SHIM_CALLS")  # a file the tests read: a call SGLang caught is seen too
        if record:
            with open(record, "a") as f:
                f.write(name + "\n")
        raise RuntimeError(f"sgl_kernel shim: {name} called; the CPU build of sgl-kernel is not installed")

    call.__name__ = call.__qualname__ = name.rpartition(".")[2]
    call.__module__ = name.rpartition(".")[0] or "sgl_kernel"
    return call


def _module_getattr(modname: str):
    def __getattr__(attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)  # keeps importlib, pickle, inspect and hasattr() probes honest
        return _stub(f"{modname}.{attr}")

    return __getattr__


__getattr__ = _module_getattr("sgl_kernel")


# submodules SGLang imports inside ``try/except ImportError`` with its own kernel-free fallback: left absent,
# so SGLang takes that fallback (e.g. ``quantization/utils.py: get_scalar_types``)
ABSENT = {"sgl_kernel.scalar_type"}


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any other ``sgl_kernel.<sub>`` import gets a module with the same raising ``__getattr__``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_kernel.") and fullname not in ABSENT:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_getattr(spec.name)
        return mod

    def exec_module(self, module):
        pass


if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SubmoduleFinder())
