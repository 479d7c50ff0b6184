"""Quantization schemes: frozen, validated dataclasses with the presets as data.

A scheme says how one linear layer's weight is quantized.  Integrations (CLI, API, transformers config,
vLLM/SGLang configs) convert whatever they receive into these objects; nothing keeps parallel fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import SchemeError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = 16  # bits >= 16 means "leave this layer in float"


@dataclass(frozen=True)
class QuantScheme:
    """How one layer's weight is quantized; ``data_type`` names its weight family (``dtypes``).

    bits: 2..8 (16 = keep float).  group_size: -1 = one group per output row, 0 = one group for the whole
    tensor, N > 0 = N consecutive input channels per group (a ragged last group is allowed).
    sym: symmetric (full range, zero point 2**(bits-1)) or asymmetric (min/max with an integer zero point).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SchemeError(f"bits must be an integer, got {self.bits!r}; valid: {_bits_choices()}")
        if self.bits not in SUPPORTED_BITS and self.bits < FLOAT_BITS:
            raise SchemeError(f"bits={self.bits} is not supported; valid: {_bits_choices()}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise SchemeError(
                f"group_size={self.group_size!r} is invalid; valid: -1 (per output channel), "
                "0 (per tensor) or a positive integer such as 32, 64 or 128"
            )
        if not isinstance(self.sym, bool):
            raise SchemeError(f"sym must be True or False, got {self.sym!r}")
        from .dtypes import family_of  # the data-type registry (it imports this module)

        family = family_of(self)  # an unknown data_type fails here
        if not self.is_float:
            family.validate(self)
        if self.act_bits != 16:
            raise SchemeError(
                f"act_bits={self.act_bits} is not supported: only weight-only schemes (act_bits=16, 'A16') are"
                f" available; valid presets: {', '.join(PRESETS)}"
            )

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS

    def replace(self, **changes: Any) -> "QuantScheme":
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "scheme override")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "QuantScheme":
        _check_keys(values, "scheme")
        return cls(**dict(values))

    def describe(self) -> str:
        if self.is_float:
            return "float (not quantized)"
        from .dtypes import family_of

        return family_of(self).describe(self)


FLOAT = QuantScheme(bits=16, group_size=-1)

# The presets of the reference tool, as data.
PRESETS: dict[str, QuantScheme] = {
    "W2A16": QuantScheme(bits=2, group_size=128, sym=True),
    "W2A16G32": QuantScheme(bits=2, group_size=32, sym=True),
    "W2A16G64": QuantScheme(bits=2, group_size=64, sym=True),
    "W3A16": QuantScheme(bits=3, group_size=128, sym=True),
    "W4A16": QuantScheme(bits=4, group_size=128, sym=True),
    "W5A16": QuantScheme(bits=5, group_size=128, sym=True),
    "W6A16": QuantScheme(bits=6, group_size=128, sym=True),
    "W7A16": QuantScheme(bits=7, group_size=128, sym=True),
    "W8A16": QuantScheme(bits=8, group_size=128, sym=True),
    "BF16": FLOAT,
    "FP16": FLOAT,
}


def _bits_choices() -> str:
    return ", ".join(str(b) for b in SUPPORTED_BITS) + f" (or {FLOAT_BITS} to keep a layer in float)"


def _check_keys(values: Mapping[str, Any], what: str) -> None:
    valid = [f.name for f in dataclasses.fields(QuantScheme)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise SchemeError(f"unknown {what} key(s) {unknown}; valid keys: {', '.join(valid)}")


# The reference tool's presets whose data types are not built here yet: named in the error instead of "unknown".
NOT_BUILT: dict[str, str] = {
    **{n: "OCP microscaling (MX) floating-point weights" for n in ("MXFP4", "MXFP4_RCEIL", "MXFP8", "MXFP8_RCEIL")},
    "MXINT4": "OCP microscaling (MX) integer weights",
    "NVFP4": "NVIDIA's FP4 (E2M1, FP8 group scales)",
    **{n: "FP8 weights" for n in ("FPW8A16", "FP8_STATIC", "FP8_BLOCK", "FP8")},
    "INT8_W8A8": "INT8 weights with INT8 activations",
}


def preset(name: str) -> QuantScheme:
    key = name.strip().upper()
    if key in NOT_BUILT and key not in PRESETS:
        raise SchemeError(
            f"scheme {name!r} ({NOT_BUILT[key]}) is not built yet; built schemes: {', '.join(PRESETS)}"
        )
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; valid schemes: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_scheme(
    scheme: "str | QuantScheme | Mapping[str, Any] | None" = "W4A16",
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    act_bits: int | None = None,
) -> QuantScheme:
    """Turn a preset name, a dict or a scheme plus optional overrides into one validated scheme."""
    if scheme is None:
        base = PRESETS["W4A16"]
    elif isinstance(scheme, QuantScheme):
        base = scheme
    elif isinstance(scheme, str):
        base = preset(scheme)
    elif isinstance(scheme, Mapping):
        base = QuantScheme.from_dict(scheme)
    else:
        raise SchemeError(
            f"scheme must be a preset name ({', '.join(PRESETS)}), a dict or a QuantScheme, got {type(scheme).__name__}"
        )
    return base.replace(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits)


# the registered weight families add their presets (GGUF:Q4_K_M ...); families registered later add theirs
from .dtypes import families as _families  # noqa: E402

for _family in _families().values():
    PRESETS.update(_family.presets())
PRESETS_COMPLETE = True

