"""Quantization: schemes, math, calibration data, RTN/SignRound, export formats, CLI."""

from .errors import AutoRoundError
from .schemes import PRESETS, QuantScheme, resolve_scheme

__all__ = ["AutoRoundError", "PRESETS", "QuantScheme", "resolve_scheme"]
