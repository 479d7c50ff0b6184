"""Quantization: schemes, math, calibration data, RTN/SignRound, export formats, CLI.

The names below are imported on first use, so that ``autoround.quantizer.cli`` parses its arguments (and answers
``-h`` or an argparse error) before torch is imported."""

from __future__ import annotations

from typing import Any

from .errors import AutoRoundError

_LAZY = {"PRESETS": "schemes", "QuantScheme": "schemes", "resolve_scheme": "schemes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AutoRoundError", "PRESETS", "QuantScheme", "resolve_scheme"]
