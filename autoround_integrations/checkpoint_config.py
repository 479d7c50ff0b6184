"""Reading a checkpoint's ``quantization_config`` into schemes: shared by the transformers, vLLM and SGLang
adapters, so they resolve per-layer settings identically."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from autoround.quantizer.errors import SchemeError
from autoround.quantizer.formats.auto_round import PACKING_ALIASES, zero_offset
from autoround.quantizer.schemes import FLOAT, QuantScheme

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
        data_type = cfg.get("data_type") or "int"
        default = QuantScheme(
            bits=int(cfg.get("bits", 4)),
            group_size=int(cfg.get("group_size", 128)),
            sym=bool(cfg.get("sym", True)),
            data_type=data_type,
        )
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
        return cls(
            default, packing, tuple(flat), dict(cfg.get("extra_config") or {}), tuple(dynamic), tuple(float_patterns)
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
        if bits >= 16 or data_type in ("float", "fp", "bf16", "fp16"):
            return FLOAT
        return QuantScheme(
            bits=bits,
            group_size=int(override.get("group_size", self.default.group_size)),
            sym=bool(override.get("sym", self.default.sym)),
            data_type=data_type,
        )
