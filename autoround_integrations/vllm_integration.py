"""vLLM quantization method ``auto-round``: serves AutoRound checkpoints through this project's kernels.

Installing this project is all a user does: the ``vllm.general_plugins`` entry point runs ``register()`` in
every vLLM process, which registers ``AutoRoundVllmConfig`` under the name ``auto-round``; its
``override_quantization_method`` claims every checkpoint whose ``quant_method`` is ``auto-round`` (and GPTQ
checkpoints when the user passes ``quantization="auto-round"``) before vLLM's built-in methods.

Per layer (``get_quant_method``): the scheme comes from ``autoround.engine_common.EnginePlanner`` (the rules
of the transformers loader), fused layers whose parts differ fail naming them; on CUDA, layers that vLLM's
GPTQ machinery runs (Marlin/Machete/ExLlama through ``AutoGPTQConfig``) are handed to it; every other
layer runs this project's kernel chosen by ``autoround.backends.select_kernel``, in either packing layout
(GPTQ, or AWQ for ``auto_round:auto_awq``) through ``autoround.packed_linear.PackedLinear``, the core shared
with the SGLang adapter; this module only supplies vLLM's classes to it.

This module imports vLLM: import it only where vLLM is installed.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)
from vllm.platforms import current_platform

from autoround.quantizer.errors import SchemeError

from . import engine_common as ec
from .log import logger
from .packed_linear import AutoRoundConfigBase, EngineHooks, PackedLinear, ParamKinds, layer_report

__all__ = ["AutoRoundLinearMethod", "AutoRoundVllmConfig", "layer_report", "register"]


def _tp_size(layer: torch.nn.Module | None = None) -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except Exception:  # no distributed state (unit use)
        return 1


def _capability() -> int | None:
    cap = current_platform.get_device_capability()
    return None if cap is None else cap.to_int()


VLLM_HOOKS = EngineHooks(
    name="vLLM",
    params=ParamKinds(PackedvLLMParameter, PackedColumnParameter, ChannelQuantScaleParameter,
                      GroupQuantScaleParameter, RowvLLMParameter),
    device=lambda: current_platform.device_type or "cpu",
    tp_size=_tp_size,
    is_qkv=lambda layer: "QKV" in type(layer).__name__,
)


@register_quantization_config(ec.QUANT_METHOD)
class AutoRoundVllmConfig(AutoRoundConfigBase, QuantizationConfig):
    """The ``auto-round`` method: AutoRound (and GPTQ v1) integer weight-only checkpoints."""

    def __init__(self, full_config: dict[str, Any]) -> None:
        QuantizationConfig.__init__(self)
        self.setup(full_config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundVllmConfig":
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        # the checkpoint's tensor names let layers that the writer kept in float load as float, and
        # missing tensors fail before any weight is read
        self.set_checkpoint_folder(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        is_head = isinstance(layer, ParallelLMHead)
        if not (isinstance(layer, LinearBase) or is_head):
            return None
        plan = self.linear_plan(prefix)
        if plan is None:
            return UnquantizedEmbeddingMethod() if is_head else UnquantizedLinearMethod()
        if not is_head and current_platform.is_cuda():
            engine = self._engine_method(layer, prefix, plan)
            if engine is not None:
                return engine
        return AutoRoundLinearMethod(self, plan, lm_head=is_head)

    def _gptq_method(self, layer: torch.nn.Module, prefix: str, scheme) -> QuantizeMethodBase | None:
        """vLLM's GPTQ method (Marlin/Machete/ExLlama, or GPTQ-Marlin MoE) for one layer."""
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

        cfg = AutoGPTQConfig.from_config(
            {"bits": scheme.bits, "group_size": scheme.group_size, "desc_act": False,
             "sym": scheme.sym, "lm_head": False, "dynamic": {}}
        )
        cfg.packed_modules_mapping = self.packed_modules_mapping
        cfg.modules_in_block_to_quantize = [prefix]
        return cfg.get_quant_method(layer, prefix)

    def _engine_method(self, layer: torch.nn.Module, prefix: str, plan: ec.LayerPlan) -> QuantizeMethodBase | None:
        """vLLM's own GPTQ kernels for a layer they fit (CUDA only), else None."""
        in_features = getattr(layer, "input_size_per_partition", 0)
        out_features = sum(getattr(layer, "output_partition_sizes", [0]))
        if not self.engine_kernels_fit("vLLM", plan, in_features, out_features, _capability()):
            return None
        try:
            return self._gptq_method(layer, prefix, plan.scheme)
        except (ValueError, NotImplementedError) as exc:  # no engine kernel after all: ours
            logger.info("vLLM kernels cannot run %s (%s); using autoround kernels", prefix, exc)
            return None

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        num_experts = int(getattr(layer, "global_num_experts", 0) or getattr(layer, "num_experts", 0))
        plan = self.moe_plan(prefix, num_experts, current_platform.is_cuda(), "vLLM")
        if plan is None:
            return None
        return self._gptq_method(layer, prefix, plan.scheme)


@register_weight_loader_v2_supported_method
class AutoRoundLinearMethod(PackedLinear, LinearMethodBase):
    """Packed weights (GPTQ or AWQ layout) in vLLM parameters, run by an ``autoround.backends`` kernel; the
    work is ``packed_linear.PackedLinear``'s."""

    engine = VLLM_HOOKS

    def embedding(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise SchemeError(f"{self.plan.prefix} is quantized and cannot be used as an input embedding")


_REGISTERED = False


def register() -> None:
    """Entry point of ``vllm.general_plugins``: importing this module registered the method already."""
    global _REGISTERED
    if not _REGISTERED:
        logger.debug("autoround: vLLM quantization method %r registered", ec.QUANT_METHOD)
        _REGISTERED = True
