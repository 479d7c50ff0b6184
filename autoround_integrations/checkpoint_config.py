"""Reading a checkpoint's ``quantization_config`` into schemes: shared by the transformers, vLLM and SGLang
adapters, so they resolve per-layer settings identically."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from autoround.quantizer.errors import SchemeError
from autoround.quantizer.formats.auto_round import PACKING_ALIASES, zero_offset
from autoround.quantizer.schemes import FLOAT, QuantScheme
from autoround.quantizer.transforms.rotation import RotationSpec

_REGEX_CHARS = set("*+?[](){}|^$\\")


@dataclass(frozen=True)
class CheckpointQuantConfig:
    default: QuantScheme
    packing_format: str
    block_names: tuple[str, ...] = ()
    extra_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # GPTQModel ``dynamic``: (regex, override or None = left in float), first match wins
    dynamic: tuple[tuple[str, Mapping[str, Any] | None], ...] = ()
    # AWQ ``modules_to_not_convert`` (and lm_head of GPTQ/AWQ checkpoints): name substrings left in float
    float_patterns: tuple[str, ...] = ()
    # ``rotation_config``: every quantized layer's input is rotated (``transforms.rotation``)
    rotation: RotationSpec | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "CheckpointQuantConfig":
        cfg = dict(cfg)
        method = str(cfg.get("source_quant_method") or cfg.get("quant_method", "auto-round"))
        if method == "awq":  # AutoAWQ spellings
            cfg["bits"] = cfg.get("bits") or cfg.get("w_bit") or 4
            cfg["group_size"] = cfg.get("group_size") or cfg.get("q_group_size") or 128
            cfg["sym"] = not cfg.get("zero_point", True)
        if cfg.get("bits") is None:
            cfg["bits"] = 4
        raw_packing = cfg.get("packing_format") or {"gptq": "auto_round:auto_gptq", "awq": "awq"}.get(method)
        if raw_packing is None:
            raw_packing = "auto_round:auto_gptq" if cfg.get("sym", True) else "auto_round"
        packing = PACKING_ALIASES.get(str(raw_packing))
        if packing is None:
            raise SchemeError(
                f"packing_format {raw_packing!r} is not supported by this loader; supported: "
                f"{', '.join(sorted(set(PACKING_ALIASES)))}"
            )
        default = _scheme(cfg, QuantScheme())
        blocks = cfg.get("block_name_to_quantize") or cfg.get("to_quant_block_names") or ()
        if isinstance(blocks, str):
            blocks = [b for b in blocks.split(",") if b]
        flat = []
        for b in blocks:  # Intel nests lists for multimodal models
            flat.extend(b if isinstance(b, (list, tuple)) else [b])
        dynamic = []
        for key, val in dict(cfg.get("dynamic") or {}).items():
            if key.startswith("-:"):
                dynamic.append((key[2:], None))
            else:
                dynamic.append((key[2:] if key.startswith("+:") else key, dict(val or {})))
        float_patterns = list(cfg.get("modules_to_not_convert") or [])
        if method in ("gptq", "awq") and not cfg.get("lm_head", False):
            float_patterns.append("lm_head")
        try:
            rotation = RotationSpec.parse(cfg.get("rotation_config"))
        except ValueError as exc:
            raise SchemeError(f"this checkpoint's rotation_config cannot be applied: {exc}") from None
        return cls(
            default, packing, tuple(flat), dict(cfg.get("extra_config") or {}), tuple(dynamic), tuple(float_patterns),
            rotation,
        )

    @property
    def zero_offset(self) -> int:
        return zero_offset(self.packing_format)

    def _override(self, layer_name: str) -> Mapping[str, Any] | None:
        for pattern, val in self.dynamic:
            if re.match(pattern, layer_name):
                return {"bits": 16} if val is None else val
        if layer_name in self.extra_config:
            return self.extra_config[layer_name]
        for key, val in self.extra_config.items():
            if set(key) & _REGEX_CHARS and re.search(key, layer_name):
                return val
        return None

    def in_blocks(self, layer_name: str) -> bool:
        if not self.block_names:
            return True
        return any(layer_name == b or layer_name.startswith(b + ".") for b in self.block_names)

    def scheme_for(self, layer_name: str) -> QuantScheme:
        """The scheme of a linear layer; ``FLOAT`` when the checkpoint keeps it in float."""
        if any(p and p in layer_name for p in self.float_patterns):
            return FLOAT
        override = self._override(layer_name)
        if override is None and not self.in_blocks(layer_name):
            return FLOAT
        if override is None:
            return self.default
        data_type = override.get("data_type", self.default.data_type)
        bits = int(override.get("bits", self.default.bits))
        if bits >= 16 or data_type in ("float", "bf16", "fp16"):  # "fp" with 8 bits is FP8, quantized
            return FLOAT
        return _scheme(override, self.default)


def _group_size(value: Any) -> "int | tuple[int, int]":
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


def _scheme(cfg: Mapping[str, Any], base: QuantScheme) -> QuantScheme:
    """The scheme ``cfg`` (a checkpoint's config or one ``extra_config`` entry) spells, its missing keys taken
    from ``base``; the act_* keys of low-bit float checkpoints included."""
    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    act_bits = int(get("act_bits", base.act_bits))
    act_data_type = get("act_data_type", base.act_data_type)
    return QuantScheme(
        bits=int(get("bits", base.bits)),
        group_size=_group_size(get("group_size", base.group_size)),
        sym=bool(get("sym", base.sym)),
        data_type=str(get("data_type", base.data_type)),
        act_bits=act_bits if act_bits < 16 else 16,
        act_group_size=int(get("act_group_size", base.act_group_size)) if act_bits < 16 else -1,
        act_sym=bool(get("act_sym", base.act_sym)),
        act_data_type=(None if act_data_type in (None, "float") else str(act_data_type)) if act_bits < 16 else None,
        act_dynamic=bool(get("act_dynamic", base.act_dynamic)) if act_bits < 16 else True,
    )
