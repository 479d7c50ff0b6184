"""SGLang quantization method ``auto-round``: serves AutoRound checkpoints through this project's kernels.

Installing this project is all a user does: the ``sglang.srt.plugins`` entry point runs ``register()`` in
every SGLang process (the engine, the scheduler and its workers all call ``load_plugins()`` before they build
a model), which puts ``AutoRoundSglangConfig`` into SGLang's method registry under the name ``auto-round``.
That replaces SGLang's built-in ``auto-round`` method (which on CPU needs Intel AMX and 4-bit weights and on
CUDA only hands layers to GPTQ/AWQ Marlin).  Without the entry point (a source tree that is not installed),
call ``autoround.sglang_integration.register()`` before ``sglang.Engine(...)``; it is idempotent.  SGLang's
own plugin filter applies: ``SGLANG_PLUGINS`` set to a list without ``autoround`` keeps the built-in method.

Per layer (``get_quant_method``): the scheme comes from ``autoround.engine_common.EnginePlanner`` (the rules
of the transformers loader: bits, group_size, sym, ``extra_config``, ``block_name_to_quantize``); fused
layers (qkv, gate_up, MoE experts) whose parts differ fail naming them.  On CUDA, layers that SGLang's
GPTQ-Marlin kernels run (symmetric 4/8-bit, group -1/32/64/128) are handed to ``GPTQMarlinLinearMethod``;
every other layer, and every layer on CPU, runs this project's kernel chosen by
``autoround.backends.select_kernel``.  Packed tensors are SGLang parameters (``PackedvLLMParameter`` and
friends) loaded through the layer's ``weight_loader_v2``, so fused qkv/gate_up layers and tensor-parallel
shards load the way SGLang's GPTQ method loads them.  That packed-layer work is
``autoround.packed_linear.PackedLinear``'s, the core shared with the vLLM adapter; this module only supplies
SGLang's classes to it.

This module imports SGLang: import it only where SGLang is installed.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.distributed.utils import get_group_rank_size
from sglang.srt.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)
from sglang.srt.layers.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
    QuantizeMethodBase,
)
from sglang.srt.layers.quantization.base_scheme import BaseLinearScheme
from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod
from sglang.srt.utils import is_cuda, is_xpu

from . import engine_common as ec
from .log import logger
from .packed_linear import AutoRoundConfigBase, EngineHooks, PackedLinear, ParamKinds, layer_report

__all__ = ["AutoRoundLinearMethod", "AutoRoundLinearScheme", "AutoRoundSglangConfig", "layer_report", "register"]

# keys SGLang's loader adds to the checkpoint's quantization_config before from_config()
_SGLANG_KEYS = ("packed_modules_mapping", "hf_config")


def _device() -> str:
    if is_cuda():
        return "cuda"
    if is_xpu():
        return "xpu"
    return "cpu"


def _capability() -> int | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _tp_size(layer: torch.nn.Module) -> int:
    return get_group_rank_size(getattr(layer, "tp_group", None))[1]


def _packed_mapping(mapping: Any) -> dict[str, list[str]]:
    """The model's fused-layer mapping (``qkv_proj -> [q_proj, k_proj, v_proj]``); nested per-submodule
    mappings that some platforms add are left out (the defaults cover them)."""
    out: dict[str, list[str]] = {}
    for key, val in dict(mapping or {}).items():
        if isinstance(val, (list, tuple)) and all(isinstance(v, str) for v in val):
            out[str(key)] = list(val)
    return out


SGLANG_HOOKS = EngineHooks(
    name="SGLang",
    params=ParamKinds(PackedvLLMParameter, PackedColumnParameter, ChannelQuantScaleParameter,
                      GroupQuantScaleParameter, RowvLLMParameter),
    device=_device,
    tp_size=_tp_size,
    is_qkv=lambda layer: isinstance(layer, QKVParallelLinear),
)


class AutoRoundSglangConfig(AutoRoundConfigBase, QuantizationConfig):
    """The ``auto-round`` method: AutoRound (and GPTQ v1) integer weight-only checkpoints."""

    BACKEND_KEYS = ("sglang_backend", "backend")

    def __init__(self, full_config: dict[str, Any]) -> None:
        QuantizationConfig.__init__(self)
        self.setup({k: v for k, v in dict(full_config).items() if k not in _SGLANG_KEYS})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundSglangConfig":
        """The checkpoint's ``quantization_config``; SGLang's loader adds the model's fused-layer mapping and
        its ``hf_config``, whose ``_name_or_path`` (a local folder) gives the checkpoint's tensor names."""
        cfg = cls(config)
        mapping = _packed_mapping(config.get("packed_modules_mapping"))
        if mapping:
            cfg.packed_modules_mapping = mapping
        hf_config = config.get("hf_config")
        folder = getattr(hf_config, "_name_or_path", None) if hf_config is not None else None
        cfg.set_checkpoint_folder(folder)
        return cfg

    def get_scaled_act_names(self) -> list[str]:
        return []

    def update_packed_modules_mapping(self, mapping: dict[str, list[str]]) -> None:
        self.packed_modules_mapping = _packed_mapping(mapping) or self.packed_modules_mapping

    # --- per layer -----------------------------------------------------------------------------------
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # imported here, not at the top: register() must work wherever SGLang's registry imports
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, FusedMoE):
            return self._moe_method(layer, prefix)
        is_head = isinstance(layer, ParallelLMHead)
        if not (isinstance(layer, LinearBase) or is_head):
            return None  # embeddings and other modules stay as SGLang builds them
        plan = self.linear_plan(prefix)
        if plan is None:
            return UnquantizedEmbeddingMethod() if is_head else UnquantizedLinearMethod()
        # a quantized head has no ``weight``: SGLang's logits processor then calls our method's apply()
        # (the path it keeps for GGUF heads); it always runs on this project's kernels
        if not is_head and is_cuda():
            engine = self._engine_method(layer, prefix, plan)
            if engine is not None:
                return engine
        # the scheme makes SGLang load this layer through weight_loader_v2 (parameter-class loaders)
        layer.scheme = AutoRoundLinearScheme(self, plan, lm_head=is_head)
        return AutoRoundLinearMethod(self)

    def _gptq_config(self, scheme):
        from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig

        return GPTQMarlinConfig(
            weight_bits=scheme.bits, group_size=scheme.group_size, is_sym=True, lm_head_quantized=False,
            desc_act=False, dynamic={}, full_config={},
        )

    def _engine_method(self, layer: torch.nn.Module, prefix: str, plan: ec.LayerPlan) -> QuantizeMethodBase | None:
        """SGLang's GPTQ-Marlin kernels for a layer they fit (CUDA only), else None."""
        tp = _tp_size(layer)
        in_features, out_features = layer.input_size, layer.output_size
        if isinstance(layer, RowParallelLinear):
            in_features //= tp
        else:
            out_features //= tp
        if not self.engine_kernels_fit("SGLang", plan, in_features, out_features, _capability()):
            return None
        try:
            from sglang.srt.layers.quantization.gptq import GPTQMarlinLinearMethod

            return GPTQMarlinLinearMethod(self._gptq_config(plan.scheme))
        except (ImportError, ValueError, NotImplementedError) as exc:  # no engine kernel after all: ours
            logger.info("SGLang kernels cannot run %s (%s); using autoround kernels", prefix, exc)
            return None

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        plan = self.moe_plan(prefix, int(getattr(layer, "num_experts", 0) or 0), is_cuda(), "SGLang")
        if plan is None:
            return None  # SGLang's unquantized MoE method
        from sglang.srt.layers.quantization.gptq import GPTQMarlinMoEMethod

        return GPTQMarlinMoEMethod(self._gptq_config(plan.scheme))


class AutoRoundLinearMethod(LinearMethodBase):
    """SGLang's linear-method interface; the work is done by the layer's ``AutoRoundLinearScheme``."""

    def __init__(self, config: AutoRoundSglangConfig) -> None:
        self.quant_config = config

    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        layer.scheme.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.scheme.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.scheme.apply_weights(layer, x, bias)


class AutoRoundLinearScheme(PackedLinear, BaseLinearScheme):
    """Packed weights (GPTQ or AWQ layout) in SGLang parameters, run by an ``autoround.backends`` kernel; the
    work is ``packed_linear.PackedLinear``'s."""

    engine = SGLANG_HOOKS
    requires_weight_loader_v2 = True  # our parameters load through their own (parameter-class) loaders


def register() -> None:
    """Entry point of ``sglang.srt.plugins``: makes ``AutoRoundSglangConfig`` SGLang's ``auto-round`` method.

    SGLang resolves a method name through ``QUANTIZATION_METHODS`` (and, on AMX CPUs, the CPU subset
    ``CPU_QUANTIZATION_METHODS``); the entry is replaced in each registry that has one, so checkpoints whose
    ``quant_method`` is ``auto-round`` load through this project.  Idempotent."""
    from sglang.srt.layers import quantization as registry

    for table in ("BASE_QUANTIZATION_METHODS", "QUANTIZATION_METHODS", "CPU_QUANTIZATION_METHODS"):
        methods = getattr(registry, table, None)
        if isinstance(methods, dict) and methods.get(ec.QUANT_METHOD) is not AutoRoundSglangConfig:
            methods[ec.QUANT_METHOD] = AutoRoundSglangConfig
    logger.debug("autoround: SGLang quantization method %r registered", ec.QUANT_METHOD)
