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
shards load the way SGLang's GPTQ method loads them.

This module imports SGLang: import it only where SGLang is installed.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

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

from autoround.quantizer.errors import SchemeError

from . import engine_common as ec
from .log import logger

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


def _packed_mapping(mapping: Any) -> dict[str, list[str]]:
    """The model's fused-layer mapping (``qkv_proj -> [q_proj, k_proj, v_proj]``); nested per-submodule
    mappings that some platforms add are left out (the defaults cover them)."""
    out: dict[str, list[str]] = {}
    for key, val in dict(mapping or {}).items():
        if isinstance(val, (list, tuple)) and all(isinstance(v, str) for v in val):
            out[str(key)] = list(val)
    return out


class AutoRoundSglangConfig(QuantizationConfig):
    """The ``auto-round`` method: AutoRound (and GPTQ v1) integer weight-only checkpoints."""

    def __init__(self, full_config: dict[str, Any]) -> None:
        super().__init__()
        self.full_config = {k: v for k, v in dict(full_config).items() if k not in _SGLANG_KEYS}
        self.ckpt = ec.parse_checkpoint_config(self.full_config)
        self.planner = ec.EnginePlanner(self.ckpt)
        self.backend = ec.resolve_backend(self.full_config.get("sglang_backend") or self.full_config.get("backend"))

    def __repr__(self) -> str:
        return f"AutoRoundSglangConfig({self.ckpt.default.describe()}, packing={self.ckpt.packing_format})"

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

    def set_checkpoint_folder(self, folder: str | None) -> None:
        """Reads the tensor names of a local checkpoint: layers the writer kept in float then load as float,
        and missing tensors fail before any weight is read."""
        self.planner.set_tensor_names(ec.checkpoint_tensor_names(folder))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        return ec.QUANT_METHOD if ec.claims(hf_quant_cfg, user_quant) else None

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
        plan = self.planner.plan(prefix, self.packed_modules_mapping)
        if not plan.quantized:
            return UnquantizedEmbeddingMethod() if is_head else UnquantizedLinearMethod()
        self.planner.require_tensors(plan, prefix)
        if is_head:
            # a quantized head has no ``weight``: SGLang's logits processor then calls our method's apply()
            # (the path it keeps for GGUF heads); it always runs on this project's kernels
            layer.scheme = AutoRoundLinearScheme(self, plan, lm_head=True)
            return AutoRoundLinearMethod(self)
        if is_cuda():
            engine = self._engine_method(layer, prefix, plan)
            if engine is not None:
                return engine
        # the scheme makes SGLang load this layer through weight_loader_v2 (parameter-class loaders)
        layer.scheme = AutoRoundLinearScheme(self, plan)
        return AutoRoundLinearMethod(self)

    def _engine_method(self, layer: torch.nn.Module, prefix: str, plan: ec.LayerPlan) -> QuantizeMethodBase | None:
        """SGLang's GPTQ-Marlin kernels for a layer they fit (CUDA only), else None."""
        if ec.is_awq_layout(self.ckpt.packing_format):
            return None  # AWQ-packed layers are asymmetric: cuda_route sends them to our kernels anyway
        _, tp = get_group_rank_size(getattr(layer, "tp_group", None))
        in_features, out_features = layer.input_size, layer.output_size
        if isinstance(layer, RowParallelLinear):
            in_features //= tp
        else:
            out_features //= tp
        route, why = ec.cuda_route(plan.scheme, self.ckpt.packing_format, in_features, out_features, _capability())
        logger.debug("SGLang %s: %s", prefix, why)
        if route != ec.ROUTE_ENGINE:
            return None
        try:
            from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig, GPTQMarlinLinearMethod

            cfg = GPTQMarlinConfig(
                weight_bits=plan.scheme.bits, group_size=plan.scheme.group_size, is_sym=True,
                lm_head_quantized=False, desc_act=False, dynamic={}, full_config={},
            )
            return GPTQMarlinLinearMethod(cfg)
        except (ImportError, ValueError, NotImplementedError) as exc:  # no engine kernel after all: ours
            logger.info("SGLang kernels cannot run %s (%s); using autoround kernels", prefix, exc)
            return None

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        num_experts = int(getattr(layer, "num_experts", 0) or 0)
        plan = self.planner.plan_experts(prefix, num_experts)
        if not plan.quantized:
            return None  # SGLang's unquantized MoE method
        self.planner.require_tensors(plan, prefix, experts=True)
        scheme = plan.scheme
        if is_cuda() and scheme.sym and scheme.bits in (4, 8) and not ec.is_awq_layout(self.ckpt.packing_format):
            from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig, GPTQMarlinMoEMethod

            cfg = GPTQMarlinConfig(
                weight_bits=scheme.bits, group_size=scheme.group_size, is_sym=True, lm_head_quantized=False,
                desc_act=False, dynamic={}, full_config={},
            )
            return GPTQMarlinMoEMethod(cfg)
        raise SchemeError(
            f"MoE layer {prefix} has quantized experts ({scheme.describe()}): the SGLang auto-round method runs "
            "quantized experts only with SGLang's GPTQ-Marlin MoE kernels (CUDA, symmetric 4/8-bit, GPTQ "
            "packing); on this device load the checkpoint with transformers (autoround's loader) instead"
        )


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


class AutoRoundLinearScheme(BaseLinearScheme):
    """Packed weights (GPTQ or AWQ layout) in SGLang parameters, run by an ``autoround.backends`` kernel."""

    requires_weight_loader_v2 = True  # our parameters load through their own (parameter-class) loaders

    def __init__(self, config: AutoRoundSglangConfig, plan: ec.LayerPlan, lm_head: bool = False) -> None:
        self.config = config
        self.plan = plan
        self.lm_head = lm_head  # SGLang's ParallelLMHead: the vocabulary (output) dimension is padded
        self.packing = config.ckpt.packing_format
        self.awq = ec.is_awq_layout(self.packing)

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
        in_features = input_size_per_partition
        out_features = sum(output_partition_sizes)
        row_parallel = input_size != input_size_per_partition
        ec.check_partition(self.plan, in_features, input_size, out_features)
        # the kernel is chosen now, so an impossible layer fails before any weight is read
        self.kernel = ec.choose_kernel(
            scheme, self.packing, in_features, out_features, _device(), params_dtype, self.config.backend
        )
        shapes = ec.expected_shapes(scheme, in_features, out_features, self.packing)
        factor = Fraction(32, scheme.bits)
        if factor.denominator == 1:
            factor = int(factor)
        loader = _checked_loader(layer, self, extra_weight_attrs["weight_loader"])
        qweight = PackedvLLMParameter(
            data=torch.empty(shapes["qweight"], dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=1 if self.awq else 0, packed_factor=factor, weight_loader=loader,
        )
        zeros_data = torch.empty(shapes["qzeros"], dtype=torch.int32)
        scales_data = torch.empty(shapes["scales"], dtype=torch.float16)
        if row_parallel:  # each rank holds the groups of its input shard
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1, weight_loader=loader)
            qzeros = PackedvLLMParameter(data=zeros_data, input_dim=0, output_dim=1, packed_dim=1,
                                         packed_factor=factor, weight_loader=loader)
        else:
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=loader)
            qzeros = PackedColumnParameter(data=zeros_data, output_dim=1, packed_dim=1, packed_factor=factor,
                                           weight_loader=loader)
        params = [("qweight", qweight), ("qzeros", qzeros), ("scales", scales)]
        if not self.awq:  # GPTQ checkpoints written by auto_gptq carry a g_idx; it is checked, then dropped
            g_idx = RowvLLMParameter(data=ec.plain_g_idx(in_features, scheme.group_size), input_dim=0,
                                     weight_loader=loader)
            params.append(("g_idx", g_idx))
        for name, param in params:
            layer.register_parameter(name, param)
            param._ar_tensor = name
        layer._ar_loaded = set()
        layer._ar_sizes = {
            "in_features": input_size,
            "out_sizes": list(output_partition_sizes),
            "in_partition": in_features,
            "params_dtype": params_dtype,
        }

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_ar_kernel", None) is not None:
            return
        sizes = layer._ar_sizes
        shards = ec.expected_shard_ids(len(sizes["out_sizes"]), isinstance(layer, QKVParallelLinear))
        error = ec.missing_after_load(self.plan, shards, layer._ar_loaded)
        if error is not None:
            raise error
        tensors = {t: getattr(layer, t).data for t in ec.PACKED_TENSORS}
        out_features = tensors["scales"].shape[1]
        kernel = ec.build_kernel(
            self.kernel, self.plan.scheme, self.config.ckpt.zero_offset, tensors, sizes["in_partition"],
            out_features, None, sizes["params_dtype"], tensors["qweight"].device, self.plan.prefix,
        )
        for t in ec.PACKED_TENSORS + ("g_idx",):
            if hasattr(layer, t):
                delattr(layer, t)
        # a plain attribute, not a submodule: SGLang must not see the kernel's buffers as model weights
        object.__setattr__(layer, "_ar_kernel", kernel)
        layer._ar_kernel_name = self.kernel.name
        logger.debug("SGLang %s: %s on kernel %s", self.plan.prefix, self.plan.scheme.describe(), self.kernel.name)

    # --- compute -----------------------------------------------------------------------------------
    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = layer._ar_kernel(x)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y


def _checked_loader(layer: torch.nn.Module, scheme: AutoRoundLinearScheme, delegate):
    """SGLang's ``weight_loader_v2`` with a shape check that names the checkpoint tensor (SGLang's CPU path
    pads or narrows mismatched tensors silently), and load bookkeeping for the missing-tensor check."""

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        key = param._ar_tensor
        plan = scheme.plan
        name = f"{ec.part_name(plan, shard_id)}.{key}"
        sizes = layer._ar_sizes
        out_sizes = [layer.org_vocab_size] if scheme.lm_head else sizes["out_sizes"]  # unpadded vocabulary
        _, tp = get_group_rank_size(getattr(layer, "tp_group", None))
        want = (
            ec.checkpoint_shape(key, plan.scheme, sizes["in_features"], out_sizes, shard_id, scheme.packing)
            if tp == 1 else None
        )
        if want is not None and tuple(loaded_weight.shape) != want:
            raise ec.shape_error(name, loaded_weight.shape, plan.scheme, want)
        if key == "g_idx":
            ec.check_g_idx(ec.part_name(plan, shard_id), loaded_weight, plan.scheme.group_size)
        loaded_weight = loaded_weight.to(param.dtype)  # fp32/bf16 scales of other writers: the kernels take fp16
        try:
            if scheme.lm_head:
                _load_head(layer, param, loaded_weight, plan.scheme.bits, scheme.awq)
            elif shard_id is None:
                delegate(param, loaded_weight)
            else:
                delegate(param, loaded_weight, shard_id)
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ec.load_error(name, loaded_weight.shape, key, param.shape, plan.scheme, exc) from exc
        layer._ar_loaded.add((key, shard_id))

    return load


def _load_head(layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor, bits: int, awq: bool) -> None:
    """A quantized lm_head: this rank's slice of the vocabulary (the output dimension), zero-padded to SGLang's
    padded vocabulary.  SGLang's embedding loader shards dimension 0, which is the input dimension here."""
    key = param._ar_tensor
    if key == "g_idx":  # no output dimension
        param.data.copy_(loaded)
        return
    idx = layer.shard_indices
    start, end = idx.org_vocab_start_index, idx.org_vocab_end_index
    if key == "qzeros" or (key == "qweight" and awq):  # output columns packed 32/bits to an int32
        start, end = start * bits // 32, end * bits // 32
    part = loaded.narrow(1, start, end - start)
    param.data.zero_()
    param.data[:, : part.shape[1]].copy_(part)


def layer_report(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of a loaded SGLang model each quantization method runs; this project's layers are
    reported with their kernel, e.g. ``{"AutoRoundLinearMethod[avx2]": 120, ...}``."""
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
