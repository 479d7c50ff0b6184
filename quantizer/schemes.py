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
ACT_BITS = (4, 8, 16)
BLOCK_DATA_TYPES = ("fp", "fp8", "fp8_e4m3")  # the data types whose group_size may be a 2-D block
FLOAT_BITS = 16  # bits >= 16 means "leave this layer in float"


@dataclass(frozen=True)
class QuantScheme:
    """How one layer's weight is quantized; ``data_type`` names its weight family (``dtypes``).

    bits: 2..8 (16 = keep float).  group_size: -1 = one group per output row, 0 = one group for the whole
    tensor, N > 0 = N consecutive input channels per group (a ragged last group is allowed).
    sym: symmetric (full range, zero point 2**(bits-1)) or asymmetric (min/max with an integer zero point).
    """

    bits: int = 4
    group_size: "int | tuple[int, int]" = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    # activation quantization (act_bits < 16), simulated while tuning and in the quantized model in memory:
    # act_group_size as group_size (-1 = per token, 0 = per tensor, N = N features per group), act_data_type
    # None = the weights' data type, act_dynamic False = one static scale per tensor from the calibration data
    act_group_size: int = -1
    act_sym: bool = True
    act_data_type: str | None = None
    act_dynamic: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SchemeError(f"bits must be an integer, got {self.bits!r}; valid: {_bits_choices()}")
        if self.bits not in SUPPORTED_BITS and self.bits < FLOAT_BITS:
            raise SchemeError(f"bits={self.bits} is not supported; valid: {_bits_choices()}")
        if isinstance(self.group_size, list):
            object.__setattr__(self, "group_size", tuple(self.group_size))
        if isinstance(self.group_size, tuple):
            if self.data_type not in BLOCK_DATA_TYPES:
                raise SchemeError(
                    f"group_size={self.group_size!r} (2-D blocks) exists only for FP8 weights (data_type 'fp', "
                    f"as FP8_BLOCK); data_type {self.data_type!r} takes an integer group size"
                )
        elif isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
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
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or self.act_bits not in ACT_BITS:
            raise SchemeError(f"act_bits={self.act_bits!r} is not supported; valid: 4, 8 or 16 (16 = weight-only)")
        if not isinstance(self.act_dynamic, bool) or not isinstance(self.act_sym, bool):
            raise SchemeError(f"act_dynamic and act_sym must be True or False, got {self.act_dynamic!r}, "
                              f"{self.act_sym!r}")
        if self.act_bits < 16:
            if self.is_float:
                raise SchemeError(f"act_bits={self.act_bits} with float weights (bits {self.bits}) is not supported: "
                                  "activations are quantized only in front of quantized weights")
            act = self.act_scheme()
            if not hasattr(family_of(act), "act_quantize"):
                raise SchemeError(f"act_data_type={act.data_type!r} cannot quantize activations; valid: "
                                  "int, fp, mx_fp, mx_fp_rceil, mx_int, nv_fp4_with_static_gs")
            if not self.act_dynamic and self.act_group_size != 0:
                raise SchemeError(
                    f"static activations (act_dynamic=False) take one scale per tensor: act_group_size must be 0, "
                    f"got {self.act_group_size}"
                )

    def act_scheme(self) -> "QuantScheme":
        """The activations' quantization as a scheme (bits, group_size, sym, data_type = the act_* fields)."""
        try:
            return QuantScheme(bits=self.act_bits, group_size=self.act_group_size, sym=self.act_sym,
                               data_type=self.act_data_type or self.data_type)
        except SchemeError as exc:
            raise SchemeError(f"activation quantization (act_bits={self.act_bits}, act_group_size="
                              f"{self.act_group_size}, act_data_type={self.act_data_type!r}): {exc}") from None

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS

    def replace(self, **changes: Any) -> "QuantScheme":
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "scheme override")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.group_size, tuple):
            out["group_size"] = list(self.group_size)
        return out

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
    # INT8 weights per channel with dynamic per-token INT8 activations ("INT8_W8A8" is the reference's old name)
    "INT8": QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8, act_group_size=-1, act_data_type="int"),
    "INT8_W8A8": QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8, act_group_size=-1, act_data_type="int"),
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
    "MXFP6": "OCP microscaling FP6 (E2M3) weights",
    "NVFP4_E5M3": "NVFP4 with UE5M3 group scales",
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


# the scheme fields AutoRound(...) and the CLI may override on top of a preset
SCHEME_OVERRIDES = ("bits", "group_size", "sym", "data_type", "act_bits", "act_group_size", "act_sym",
                    "act_data_type", "act_dynamic")


def resolve_scheme(
    scheme: "str | QuantScheme | Mapping[str, Any] | None" = "W4A16",
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    act_bits: int | None = None,
    data_type: str | None = None,
    act_group_size: int | None = None,
    act_sym: bool | None = None,
    act_data_type: str | None = None,
    act_dynamic: bool | None = None,
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
    return base.replace(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits, data_type=data_type,
                        act_group_size=act_group_size, act_sym=act_sym, act_data_type=act_data_type,
                        act_dynamic=act_dynamic)


# the registered weight families add their presets (GGUF:Q4_K_M ...); families registered later add theirs
from .dtypes import families as _families  # noqa: E402

for _family in _families().values():
    PRESETS.update(_family.presets())
PRESETS_COMPLETE = True

