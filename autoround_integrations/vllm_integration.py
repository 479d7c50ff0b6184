"""vLLM quantization method ``auto-round``: serves AutoRound checkpoints through this project's kernels.

Installing this project is all a user does: the ``vllm.general_plugins`` entry point runs ``register()`` in
every vLLM process, which registers ``AutoRoundVllmConfig`` under the name ``auto-round``; its
``override_quantization_method`` claims every checkpoint whose ``quant_method`` is ``auto-round`` (and GPTQ
checkpoints when the user passes ``quantization="auto-round"``) before vLLM's built-in methods.

Per layer (``get_quant_method``): the scheme comes from ``autoround.engine_common.EnginePlanner`` (the rules
of the transformers loader), fused layers whose parts differ fail naming them; on CUDA, layers that vLLM's
GPTQ machinery runs (Marlin/Machete/ExLlama through ``AutoGPTQConfig``) are handed to it; every other
layer runs this project's kernel chosen by ``autoround.backends.select_kernel``.

This module imports vLLM: import it only where vLLM is installed.
"""

from __future__ import annotations

from fractions import Fraction
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
)
from vllm.platforms import current_platform

from autoround.quantizer.errors import SchemeError
from autoround.quantizer.qmath import group_layout

from . import engine_common as ec
from .log import logger


def _tp_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except Exception:  # no distributed state (unit use)
        return 1


def _capability() -> int | None:
    cap = current_platform.get_device_capability()
    return None if cap is None else cap.to_int()


@register_quantization_config(ec.QUANT_METHOD)
class AutoRoundVllmConfig(QuantizationConfig):
    """The ``auto-round`` method: AutoRound (and GPTQ v1) integer weight-only checkpoints."""

    def __init__(self, full_config: dict[str, Any]) -> None:
        super().__init__()
        self.full_config = dict(full_config)
        self.ckpt = ec.parse_checkpoint_config(full_config)
        self.planner = ec.EnginePlanner(self.ckpt)
        self.backend = ec.resolve_backend(full_config.get("backend"))

    def __repr__(self) -> str:
        return f"AutoRoundVllmConfig({self.ckpt.default.describe()}, packing={self.ckpt.packing_format})"

    @classmethod
    def get_name(cls) -> str:
        return ec.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantization_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundVllmConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        return ec.QUANT_METHOD if ec.claims(hf_quant_cfg, user_quant) else None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        # the checkpoint's tensor names let layers that the writer kept in float load as float, and
        # missing tensors fail before any weight is read
        self.planner.set_tensor_names(ec.checkpoint_tensor_names(model_name))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        is_head = isinstance(layer, ParallelLMHead)
        if not (isinstance(layer, LinearBase) or is_head):
            return None
        plan = self.planner.plan(prefix, self.packed_modules_mapping)
        if not plan.quantized:
            return UnquantizedEmbeddingMethod() if is_head else UnquantizedLinearMethod()
        self.planner.require_tensors(plan, prefix)
        if not is_head and current_platform.is_cuda():
            engine = self._engine_method(layer, prefix, plan)
            if engine is not None:
                return engine
        return AutoRoundLinearMethod(self, plan, lm_head=is_head)

    def _engine_method(self, layer: torch.nn.Module, prefix: str, plan: ec.LayerPlan) -> QuantizeMethodBase | None:
        """vLLM's own GPTQ kernels for a layer they fit (CUDA only), else None."""
        in_features = getattr(layer, "input_size_per_partition", 0)
        out_features = sum(getattr(layer, "output_partition_sizes", [0]))
        route, why = ec.cuda_route(plan.scheme, self.ckpt.packing_format, in_features, out_features, _capability())
        logger.debug("vLLM %s: %s", prefix, why)
        if route != ec.ROUTE_ENGINE:
            return None
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

        cfg = AutoGPTQConfig.from_config(
            {"bits": plan.scheme.bits, "group_size": plan.scheme.group_size, "desc_act": False,
             "sym": plan.scheme.sym, "lm_head": False, "dynamic": {}}
        )
        cfg.packed_modules_mapping = self.packed_modules_mapping
        cfg.modules_in_block_to_quantize = [prefix]
        try:
            return cfg.get_quant_method(layer, prefix)
        except (ValueError, NotImplementedError) as exc:  # no engine kernel after all: ours
            logger.info("vLLM kernels cannot run %s (%s); using autoround kernels", prefix, exc)
            return None

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        num_experts = int(getattr(layer, "global_num_experts", 0) or getattr(layer, "num_experts", 0))
        plan = self.planner.plan_experts(prefix, num_experts)
        if not plan.quantized:
            return None
        self.planner.require_tensors(plan, prefix, experts=True)
        if current_platform.is_cuda() and plan.scheme.sym and plan.scheme.bits in (4, 8):
            from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

            cfg = AutoGPTQConfig.from_config(
                {"bits": plan.scheme.bits, "group_size": plan.scheme.group_size, "desc_act": False,
                 "sym": True, "lm_head": False, "dynamic": {}}
            )
            cfg.packed_modules_mapping = self.packed_modules_mapping
            cfg.modules_in_block_to_quantize = [prefix]
            return cfg.get_quant_method(layer, prefix)
        raise SchemeError(
            f"MoE layer {prefix} has quantized experts ({plan.scheme.describe()}): the auto-round method runs "
            "quantized experts only with vLLM's GPTQ-Marlin MoE kernels (CUDA, symmetric 4/8-bit); on this "
            "device load the checkpoint with transformers (autoround's loader) instead"
        )


@register_weight_loader_v2_supported_method
class AutoRoundLinearMethod(LinearMethodBase):
    """Packed GPTQ-layout weights loaded into vLLM parameters, run by an ``autoround.backends`` kernel."""

    def __init__(self, config: AutoRoundVllmConfig, plan: ec.LayerPlan, lm_head: bool = False) -> None:
        self.config = config
        self.plan = plan
        self.lm_head = lm_head

    # --- weights -----------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        scheme = self.plan.scheme
        out_features = sum(output_partition_sizes)
        in_features = input_size_per_partition
        row_parallel = input_size != input_size_per_partition
        ec.check_partition(self.plan, in_features, input_size, out_features)
        # the kernel is chosen now, so an impossible layer fails before any weight is read
        device = current_platform.device_type or "cpu"
        self.kernel = ec.choose_kernel(
            scheme, self.config.ckpt.packing_format, in_features, out_features, device, params_dtype,
            self.config.backend,
        )
        _, n_groups = group_layout(in_features, scheme.group_size)
        factor = Fraction(32, scheme.bits)
        if factor.denominator == 1:
            factor = int(factor)
        loader = _checked_loader(layer, self, extra_weight_attrs["weight_loader"])
        qweight = PackedvLLMParameter(
            data=torch.empty(in_features * scheme.bits // 32, out_features, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=factor, weight_loader=loader,
        )
        zeros_data = torch.empty(n_groups, out_features * scheme.bits // 32, dtype=torch.int32)
        scales_data = torch.empty(n_groups, out_features, dtype=torch.float16)
        if row_parallel:
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1, weight_loader=loader)
            qzeros = PackedvLLMParameter(data=zeros_data, input_dim=0, output_dim=1, packed_dim=1,
                                         packed_factor=factor, weight_loader=loader)
        else:
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=loader)
            qzeros = PackedColumnParameter(data=zeros_data, output_dim=1, packed_dim=1, packed_factor=factor,
                                           weight_loader=loader)
        for name, param in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            layer.register_parameter(name, param)
            param._ar_tensor = name
        layer._ar_loaded = set()
        layer._ar_in_partition = in_features
        layer._ar_shapes = {
            "in_features": input_size,
            "out_sizes": list(output_partition_sizes),
            "params_dtype": params_dtype,
        }

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_ar_kernel", None) is not None:
            return
        shards = ec.expected_shard_ids(len(layer._ar_shapes["out_sizes"]), "QKV" in type(layer).__name__)
        error = ec.missing_after_load(self.plan, shards, layer._ar_loaded)
        if error is not None:
            raise error
        tensors = {t: getattr(layer, t).data for t in ec.PACKED_TENSORS}
        out_features = tensors["scales"].shape[1]
        in_features = layer._ar_in_partition
        kernel = ec.build_kernel(
            self.kernel, self.plan.scheme, self.config.ckpt.zero_offset, tensors, in_features, out_features,
            None, layer._ar_shapes["params_dtype"], tensors["qweight"].device, self.plan.prefix,
        )
        for t in ec.PACKED_TENSORS:
            delattr(layer, t)
        # a plain attribute, not a submodule: vLLM must not see the kernel's buffers as model weights
        object.__setattr__(layer, "_ar_kernel", kernel)
        layer._ar_kernel_name = self.kernel.name

    # --- compute -----------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = layer._ar_kernel(x)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    def embedding(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise SchemeError(f"{self.plan.prefix} is quantized and cannot be used as an input embedding")


def _checked_loader(layer: torch.nn.Module, method: AutoRoundLinearMethod, delegate):
    """vLLM's weight loader with a shape check that names the checkpoint tensor, and load bookkeeping."""

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        key = param._ar_tensor
        scheme = method.plan.scheme
        name = f"{ec.part_name(method.plan, shard_id)}.{key}"
        shapes = layer._ar_shapes
        out_sizes = [layer.org_vocab_size] if method.lm_head else shapes["out_sizes"]  # unpadded vocabulary
        want = (
            ec.checkpoint_shape(key, scheme, shapes["in_features"], out_sizes, shard_id)
            if _tp_size() == 1 else None
        )
        if want is not None and tuple(loaded_weight.shape) != want:
            raise ec.shape_error(name, loaded_weight.shape, scheme, want)
        try:
            if method.lm_head:
                _load_head(layer, param, loaded_weight)
            elif shard_id is None:
                delegate(param, loaded_weight)
            else:
                delegate(param, loaded_weight, shard_id)
        except (AssertionError, RuntimeError) as exc:
            raise ec.load_error(name, loaded_weight.shape, key, param.shape, scheme, exc) from exc
        layer._ar_loaded.add((key, shard_id))

    return load


def _load_head(layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
    """A quantized lm_head: the vocabulary (output) dimension is sharded and padded by vLLM."""
    idx = layer.shard_indices
    start, end = idx.org_vocab_start_index, idx.org_vocab_end_index
    key = param._ar_tensor
    bits = layer.quant_method.plan.scheme.bits
    if key == "qzeros":
        start, end = start * bits // 32, end * bits // 32
    part = loaded.narrow(1, start, end - start)
    param.data.zero_()
    param.data[:, : part.shape[1]].copy_(part)


def layer_report(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of a loaded vLLM model each quantization method runs; this project's layers are
    reported with their kernel, e.g. ``{"AutoRoundLinearMethod[torch]": 120, ...}``.  Use it through
    ``LLM.apply_model(layer_report)`` (the model lives in vLLM's worker processes)."""
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        key = type(method).__name__
        kernel = getattr(module, "_ar_kernel_name", None)
        if kernel:
            key += f"[{kernel}]"
        counts[key] = counts.get(key, 0) + 1
    return counts


_REGISTERED = False


def register() -> None:
    """Entry point of ``vllm.general_plugins``: importing this module registered the method already."""
    global _REGISTERED
    if not _REGISTERED:
        logger.debug("autoround: vLLM quantization method %r registered", ec.QUANT_METHOD)
        _REGISTERED = True
