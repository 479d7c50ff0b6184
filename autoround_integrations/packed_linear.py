"""The engine-neutral core of the vLLM and SGLang ``auto-round`` methods: no engine is imported here.

Both engines build a quantized linear layer the same way: the method allocates one parameter per packed
tensor (``qweight``/``qzeros``/``scales``, and ``g_idx`` for the GPTQ layout) for the whole, possibly fused,
layer; the engine's loader calls each parameter's ``weight_loader`` once per checkpoint part with a shard id;
after loading, the method turns the packed tensors into one of this project's kernels.  SGLang's parameter
classes are vLLM's, copied with the same constructors, so all of that is written once here:

- ``EngineHooks``: what differs between the engines (their parameter classes, the device, the
  tensor-parallel size of a layer, whether a layer is a fused QKV layer);
- ``PackedLinear``: ``create_weights`` (GPTQ or AWQ layout, shapes from ``engine_common.expected_shapes``),
  the checked weight loader (shapes, shard ids, ``g_idx`` order, what was loaded), the lm_head slicing for
  the padded, sharded vocabulary, ``process_weights_after_loading`` (missing tensors, then
  ``engine_common.build_kernel``) and ``apply``; each engine's method class mixes it in;
- ``AutoRoundConfigBase``: the engine-independent half of both engines' ``QuantizationConfig`` (checkpoint
  parsing, the float-layer rule, the CUDA route decision, the MoE refusal);
- ``layer_report``: which method and kernel runs each layer of a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, NamedTuple

import torch

from autoround.quantizer.errors import SchemeError

from . import engine_common as ec
from .log import logger


class ParamKinds(NamedTuple):
    """An engine's parameter classes (vLLM's ``vllm.model_executor.parameter``, SGLang's copy of them)."""

    packed: type  # PackedvLLMParameter: input and output dimension, one of them packed 32/bits to an int32
    packed_column: type  # PackedColumnParameter: output dimension only (packed)
    channel_scale: type  # ChannelQuantScaleParameter: output dimension only
    group_scale: type  # GroupQuantScaleParameter: input (groups) and output dimension
    row: type  # RowvLLMParameter: input dimension only


@dataclass(frozen=True)
class EngineHooks:
    """What one engine supplies to ``PackedLinear``."""

    name: str  # "vLLM", "SGLang": in log lines
    params: ParamKinds
    device: Callable[[], str]  # the device type this process runs layers on ("cpu", "cuda", "xpu")
    tp_size: Callable[[torch.nn.Module], int]  # tensor-parallel ranks the layer is split over
    is_qkv: Callable[[torch.nn.Module], bool]  # a fused QKV layer (loaded with shard ids "q"/"k"/"v")


def _packed_factor(bits: int) -> int | Fraction:
    factor = Fraction(32, bits)
    return int(factor) if factor.denominator == 1 else factor


class PackedLinear:
    """Packed weights (GPTQ or AWQ layout) in engine parameters, run by an ``autoround.backends`` kernel.

    A mixin for an engine's linear-method (or scheme) class, which sets ``engine``; ``config`` is the
    engine's ``AutoRoundConfigBase``.  ``lm_head``: the layer is the engine's ``ParallelLMHead``, whose
    vocabulary (output) dimension is sharded and padded by the engine and loaded here."""

    engine: EngineHooks

    def __init__(self, config: "AutoRoundConfigBase", plan: ec.LayerPlan, lm_head: bool = False) -> None:
        self.config = config
        self.plan = plan
        self.lm_head = lm_head
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
        ec.check_partition(self.plan, in_features, input_size, out_features)
        # the kernel is chosen now, so an impossible layer fails before any weight is read
        self.kernel = ec.choose_kernel(
            scheme, self.packing, in_features, out_features, self.engine.device(), params_dtype, self.config.backend
        )
        loader = self.checked_loader(layer, extra_weight_attrs["weight_loader"])
        params = self.packed_params(in_features, out_features, input_size != in_features, loader)
        for name, param in params.items():
            layer.register_parameter(name, param)
            param._ar_tensor = name
        layer._ar_loaded = set()
        layer._ar_sizes = {
            "in_features": input_size,
            "out_sizes": list(output_partition_sizes),
            "in_partition": in_features,
            "params_dtype": params_dtype,
        }

    def packed_params(
        self, in_features: int, out_features: int, row_parallel: bool, loader: Callable
    ) -> dict[str, torch.nn.Parameter]:
        """The engine parameters of one rank's partition, in the checkpoint's layout: GPTQ ``qweight``
        ``[in/f, out]`` packed along the input, AWQ ``qweight`` ``[in, out/f]`` packed along the output
        (``f`` = 32/bits); ``qzeros`` ``[groups, out/f]`` and ``scales`` ``[groups, out]`` in both."""
        kinds = self.engine.params
        scheme = self.plan.scheme
        shapes = ec.expected_shapes(scheme, in_features, out_features, self.packing)
        factor = _packed_factor(scheme.bits)
        qweight = kinds.packed(
            data=torch.empty(shapes["qweight"], dtype=torch.int32), input_dim=0, output_dim=1,
            packed_dim=1 if self.awq else 0, packed_factor=factor, weight_loader=loader,
        )
        zeros = torch.empty(shapes["qzeros"], dtype=torch.int32)
        scales = torch.empty(shapes["scales"], dtype=torch.float16)
        if row_parallel:  # each rank holds the groups of its input shard
            params = {
                "qzeros": kinds.packed(data=zeros, input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor,
                                       weight_loader=loader),
                "scales": kinds.group_scale(data=scales, input_dim=0, output_dim=1, weight_loader=loader),
            }
        else:
            params = {
                "qzeros": kinds.packed_column(data=zeros, output_dim=1, packed_dim=1, packed_factor=factor,
                                              weight_loader=loader),
                "scales": kinds.channel_scale(data=scales, output_dim=1, weight_loader=loader),
            }
        params = {"qweight": qweight, **params}
        if not self.awq:  # GPTQ checkpoints written by auto_gptq carry a g_idx; it is checked, then dropped
            params["g_idx"] = kinds.row(data=ec.plain_g_idx(in_features, scheme.group_size), input_dim=0,
                                        weight_loader=loader)
        return params

    def checked_loader(self, layer: torch.nn.Module, delegate: Callable) -> Callable:
        """The engine's weight loader with a shape check that names the checkpoint tensor (the engines'
        asserts do not, and SGLang's CPU path pads or narrows mismatched tensors silently), the ``g_idx``
        order check, and load bookkeeping for the missing-tensor check."""
        plan = self.plan
        scheme = plan.scheme

        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
            key = param._ar_tensor
            part = ec.part_name(plan, shard_id)
            name = f"{part}.{key}"
            sizes = layer._ar_sizes
            out_sizes = [layer.org_vocab_size] if self.lm_head else sizes["out_sizes"]  # unpadded vocabulary
            want = (
                ec.checkpoint_shape(key, scheme, sizes["in_features"], out_sizes, shard_id, self.packing)
                if self.engine.tp_size(layer) == 1 else None
            )
            if want is not None and tuple(loaded_weight.shape) != want:
                raise ec.shape_error(name, loaded_weight.shape, scheme, want)
            if key == "g_idx":
                ec.check_g_idx(part, loaded_weight, scheme.group_size)
            loaded_weight = loaded_weight.to(param.dtype)  # fp32/bf16 scales of other writers: kernels take fp16
            try:
                if self.lm_head:
                    self.load_head(layer, param, loaded_weight)
                elif shard_id is None:
                    delegate(param, loaded_weight)
                else:
                    delegate(param, loaded_weight, shard_id)
            except (AssertionError, RuntimeError, ValueError) as exc:
                raise ec.load_error(name, loaded_weight.shape, key, param.shape, scheme, exc) from exc
            layer._ar_loaded.add((key, shard_id))

        return load

    def load_head(self, layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        """A quantized lm_head: this rank's slice of the vocabulary (the output dimension), zero-padded to the
        engine's padded vocabulary.  The engines' embedding loaders shard dimension 0, the input dimension
        here, so the head is loaded here, from ``layer.shard_indices``."""
        key = param._ar_tensor
        if key == "g_idx":  # no output dimension
            param.data.copy_(loaded)
            return
        idx = layer.shard_indices
        start, end = idx.org_vocab_start_index, idx.org_vocab_end_index
        if key == "qzeros" or (key == "qweight" and self.awq):  # output columns packed 32/bits to an int32
            bits = self.plan.scheme.bits
            start, end = start * bits // 32, end * bits // 32
        part = loaded.narrow(1, start, end - start)
        param.data.zero_()
        param.data[:, : part.shape[1]].copy_(part)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_ar_kernel", None) is not None:
            return
        sizes = layer._ar_sizes
        shards = ec.expected_shard_ids(len(sizes["out_sizes"]), self.engine.is_qkv(layer))
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
        # a plain attribute, not a submodule: the engine must not see the kernel's buffers as model weights
        object.__setattr__(layer, "_ar_kernel", kernel)
        layer._ar_kernel_name = self.kernel.name
        logger.debug("%s %s: %s on kernel %s", self.engine.name, self.plan.prefix, self.plan.scheme.describe(),
                     self.kernel.name)

    # --- compute -----------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = layer._ar_kernel(x)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    apply_weights = apply  # SGLang's scheme interface


class AutoRoundConfigBase:
    """The engine-independent half of both engines' ``QuantizationConfig`` for the ``auto-round`` method
    (AutoRound and GPTQ v1 integer weight-only checkpoints).  Mixed in before the engine's base class."""

    # the quantization_config keys that name this project's kernel, first found wins
    BACKEND_KEYS: tuple[str, ...] = ("backend",)

    def setup(self, full_config: Mapping[str, Any]) -> None:
        self.full_config = dict(full_config)
        self.ckpt = ec.parse_checkpoint_config(self.full_config)
        self.planner = ec.EnginePlanner(self.ckpt)
        backend = next((self.full_config[k] for k in self.BACKEND_KEYS if self.full_config.get(k)), None)
        self.backend = ec.resolve_backend(backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ckpt.default.describe()}, packing={self.ckpt.packing_format})"

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
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        return ec.QUANT_METHOD if ec.claims(hf_quant_cfg, user_quant) else None

    def set_checkpoint_folder(self, folder: str | None) -> None:
        """Reads the tensor names of a local checkpoint: layers the writer kept in float then load as float,
        and missing tensors fail before any weight is read."""
        self.planner.set_tensor_names(ec.checkpoint_tensor_names(folder))

    # --- per layer -----------------------------------------------------------------------------------
    def linear_plan(self, prefix: str) -> ec.LayerPlan | None:
        """The plan of a quantized linear layer (or lm_head), its tensors checked; None for a float layer
        (the engine's unquantized method runs it)."""
        plan = self.planner.plan(prefix, self.packed_modules_mapping)
        if not plan.quantized:
            return None
        self.planner.require_tensors(plan, prefix)
        return plan

    def moe_plan(self, prefix: str, num_experts: int, on_cuda: bool, engine: str) -> ec.LayerPlan | None:
        """The plan of a fused MoE layer with quantized experts; None when float.  Experts the engine's kernels
        cannot run are refused (``moe_refusal``) before their tensors are looked for; the others' tensors are
        checked."""
        plan = self.planner.plan_experts(prefix, num_experts)
        if not plan.quantized:
            return None
        if not self.engine_moe_fits(plan, on_cuda):
            raise self.moe_refusal(plan, engine)
        self.planner.require_tensors(plan, prefix, experts=True)
        return plan

    def engine_moe_fits(self, plan: ec.LayerPlan, on_cuda: bool) -> bool:
        """Whether the engine's GPTQ-Marlin MoE kernels run these experts (symmetric 4/8-bit, GPTQ layout)."""
        scheme = plan.scheme
        return on_cuda and scheme.sym and scheme.bits in (4, 8) and not ec.is_awq_layout(self.ckpt.packing_format)

    def moe_refusal(self, plan: ec.LayerPlan, engine: str) -> SchemeError:
        return SchemeError(
            f"MoE layer {plan.prefix} has quantized experts ({plan.scheme.describe()}): the {engine} auto-round "
            f"method runs quantized experts only with {engine}'s GPTQ-Marlin MoE kernels (CUDA, symmetric "
            "4/8-bit, GPTQ packing); on this device load the checkpoint with transformers (autoround's loader) "
            "instead"
        )

    def engine_kernels_fit(
        self, engine: str, plan: ec.LayerPlan, in_features: int, out_features: int, capability: int | None
    ) -> bool:
        """Whether the engine's own GPTQ kernels run a layer of this rank's size (``cuda_route``), logged."""
        if ec.is_awq_layout(self.ckpt.packing_format):
            return False  # AWQ-packed layers are asymmetric: our kernels run them
        route, why = ec.cuda_route(plan.scheme, self.ckpt.packing_format, in_features, out_features, capability)
        logger.debug("%s %s: %s", engine, plan.prefix, why)
        return route == ec.ROUTE_ENGINE


def layer_report(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of a loaded vLLM or SGLang model each quantization method runs; this project's layers
    are reported with their kernel, e.g. ``{"AutoRoundLinearMethod[avx2]": 120, ...}``."""
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


__all__ = ["AutoRoundConfigBase", "EngineHooks", "PackedLinear", "ParamKinds", "layer_report"]
