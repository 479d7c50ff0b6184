"""Quantization schemes: frozen, validated dataclasses with the presets as data.

A scheme says how one linear layer's weight is quantized.  Integrations (CLI, API, transformers config,
vLLM/SGLang configs) convert whatever they receive into these objects; nothing keeps parallel fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import SchemeError
from .gguf_quant import GGML_TYPES, GGUF_FILE_TYPES

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = 16  # bits >= 16 means "leave this layer in float"
# "gguf:<type>": a llama.cpp block type (q4_0 ... q6_k) for one layer, or, for the model default, a llama.cpp
# file type (q4_k_m ...) whose per-layer types follow llama.cpp's rules (see formats/gguf.py)
GGUF_PREFIX = "gguf:"
GGUF_DATA_TYPES = tuple(
    GGUF_PREFIX + n
    for n in dict.fromkeys([*(t for t, v in GGML_TYPES.items() if not v.is_float), *GGUF_FILE_TYPES])
    if n not in ("f16", "bf16")
)
DATA_TYPES = ("int",) + GGUF_DATA_TYPES


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization of one layer.

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
        if self.data_type not in DATA_TYPES:
            raise SchemeError(f"data_type={self.data_type!r} is not supported; valid: {', '.join(DATA_TYPES)}")
        if self.data_type.startswith(GGUF_PREFIX) and not self.is_float:
            t = GGML_TYPES[_gguf_block_type(self.data_type)]
            if (self.bits, self.group_size, self.sym) != (t.bits, t.group_size, t.sym):
                raise SchemeError(
                    f"data_type {self.data_type} fixes bits={t.bits}, group_size={t.group_size}, sym={t.sym}; "
                    f"got bits={self.bits}, group_size={self.group_size}, sym={self.sym}. Pick another GGUF "
                    f"scheme instead of overriding ({', '.join(n for n in PRESETS if n.startswith('GGUF:'))})"
                )
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
        if self.data_type.startswith(GGUF_PREFIX):
            return f"GGUF {self.data_type[len(GGUF_PREFIX):].upper()} (W{self.bits}A{self.act_bits} llama.cpp blocks)"
        sym = "sym" if self.sym else "asym"
        return f"W{self.bits}A{self.act_bits} {self.data_type} group {self.group_size} {sym}"


FLOAT = QuantScheme(bits=16, group_size=-1)

# The presets of the reference tool, as data.
PRESETS: dict[str, QuantScheme] = {
    "W2A16": QuantScheme(bits=2, group_size=128, sym=True),
    "W2A16G32": QuantScheme(bits=2, group_size=32, sym=True),
    "W2A16G64": QuantScheme(bits=2, group_size=64, sym=True),
    "W3A16": QuantScheme(bits=3, group_size=128, sym=True),
    "W4A16": QuantScheme(bits=4, group_size=128, sym=True),
    "W8A16": QuantScheme(bits=8, group_size=128, sym=True),
    "BF16": FLOAT,
    "FP16": FLOAT,
}


def _gguf_block_type(data_type: str) -> str:
    """The block type behind a ``gguf:`` data type (a file type stands for its default block type)."""
    name = data_type[len(GGUF_PREFIX):]
    return GGUF_FILE_TYPES[name].default_type if name in GGUF_FILE_TYPES else name


def gguf_scheme(name: str) -> QuantScheme:
    """The scheme of a llama.cpp block type or file type, e.g. ``gguf_scheme("q4_k_m")``."""
    t = GGML_TYPES[_gguf_block_type(GGUF_PREFIX + name)]
    if t.is_float:
        return FLOAT
    return QuantScheme(bits=t.bits, group_size=t.group_size, sym=t.sym, data_type=GGUF_PREFIX + name)


def gguf_type_of(scheme: QuantScheme) -> str | None:
    """The llama.cpp block type of a layer scheme (None for integer schemes)."""
    if not scheme.data_type.startswith(GGUF_PREFIX):
        return None
    return _gguf_block_type(scheme.data_type)


def gguf_file_type_of(scheme: QuantScheme) -> str | None:
    """The llama.cpp file type a model-level GGUF scheme names (None if it names a bare block type)."""
    if not scheme.data_type.startswith(GGUF_PREFIX):
        return None
    name = scheme.data_type[len(GGUF_PREFIX):]
    return name if name in GGUF_FILE_TYPES else None


# GGUF presets (as the reference tool spells them): one per llama.cpp file type
PRESETS.update({f"GGUF:{ft.upper()}": gguf_scheme(ft) for ft in GGUF_FILE_TYPES})


def _bits_choices() -> str:
    return ", ".join(str(b) for b in SUPPORTED_BITS) + f" (or {FLOAT_BITS} to keep a layer in float)"


def _check_keys(values: Mapping[str, Any], what: str) -> None:
    valid = [f.name for f in dataclasses.fields(QuantScheme)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise SchemeError(f"unknown {what} key(s) {unknown}; valid keys: {', '.join(valid)}")


def preset(name: str) -> QuantScheme:
    key = name.strip().upper()
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; valid schemes: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_scheme(
    scheme: "str | QuantScheme | Mapping[str, Any] | None" = "W4A16",
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
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
    return base.replace(bits=bits, group_size=group_size, sym=sym)

