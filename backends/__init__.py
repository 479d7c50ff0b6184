"""Inference kernels for quantized linear layers, and the selector that picks one per layer.

Kernel contract (unchanged; extensions are optional and backward compatible):
``info = select_kernel(spec, backend="auto", advice=None)`` then
``layer = info.factory(in_features, out_features, bits, group_size, sym, bias, zero_offset=..., device=...)``;
fill ``qweight``/``qzeros``/``scales``/``bias`` (GPTQ layout; AWQ layout for the ``*_awq`` kernels), call
``layer.post_init()`` once, then ``layer(x)``.  Extensions: ``advice`` (an ``InstallAdvice`` per model, whose
``emit()`` logs one "pip install" warning), ``KernelInfo.compute_dtype`` (dtype a kernel computes in
internally, None = activation dtype), ``reconcile_dtype()``; ``post_init()`` of repacking kernels frees
``qweight`` (an empty tensor afterwards) and ``forward`` before ``post_init()`` raises.
"""

from __future__ import annotations

import torch

from .selector import KernelInfo, LayerSpec, kernels, register_kernel, select_kernel
from .torch_kernel import TorchQuantLinear

PACKINGS_GPTQ_LAYOUT = ("auto_round:auto_gptq", "auto_round")

register_kernel(
    KernelInfo(
        name="torch",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=(2, 3, 4, 8),
        packing_formats=PACKINGS_GPTQ_LAYOUT,
        factory=TorchQuantLinear,
    )
)

# --- AWQ layout: the pure-torch reference kernel ---
from .torch_awq_kernel import TorchAWQQuantLinear  # noqa: E402

register_kernel(
    KernelInfo(
        name="torch_awq",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=(4,),
        packing_formats=("auto_round:auto_awq", "awq"),
        factory=TorchAWQQuantLinear,
    )
)

# --- MLX layout (auto_round:mlx): the pure-torch kernel; on a Mac, mlx-lm itself runs these checkpoints ---
from autoround.quantizer.formats.packing import MLX_BITS, MLX_GROUP_SIZES  # noqa: E402

from .torch_mlx_kernel import TorchMlxQuantLinear  # noqa: E402

register_kernel(
    KernelInfo(
        name="torch_mlx",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=MLX_BITS,
        packing_formats=("auto_round:mlx",),
        group_sizes=MLX_GROUP_SIZES,
        factory=TorchMlxQuantLinear,
        description="MLX packing (weight/scales/biases), dequantized per call in float32",
    )
)

# --- low-bit floats (MXFP/MXINT/NVFP4/FP8) in the reference's auto_round packings: the pure-torch kernel.  CUDA
# serving of these types is the engines' own (vLLM/SGLang's compressed-tensors kernels: CUTLASS/Marlin FP4/FP8),
# reached through the llm_compressor / fp8 exports ---
from autoround.quantizer.formats.auto_round import FLOAT_PACKINGS, PACKING_RAW_ZP  # noqa: E402

from .torch_float_kernel import TorchFloatQuantLinear  # noqa: E402

register_kernel(
    KernelInfo(
        name="torch_float",
        priority=0,
        devices=("cpu", "cuda", "xpu"),
        bits=(4, 8),
        packing_formats=FLOAT_PACKINGS + (PACKING_RAW_ZP,),
        weight_families=("mx", "nvfp", "fp8"),
        act_bits=(4, 8, 16, 32),
        factory=TorchFloatQuantLinear,
        description="MXFP4/MXFP8/MXINT4, NVFP4, FP8: dequantized per call in float32, activations quantized as "
                    "the checkpoint says",
    )
)

__all__ = [
    "KernelInfo", "LayerSpec", "TorchAWQQuantLinear", "TorchFloatQuantLinear", "TorchMlxQuantLinear",
    "TorchQuantLinear", "kernels",
    "register_kernel", "select_kernel",
]


# --- fast CPU paths, declared device kernels, AWQ variants --------
# The kernel contract every entry keeps (loaders and the vLLM/SGLang methods rely on it):
#   info = select_kernel(spec, backend, advice=None)       # spec: LayerSpec; advice: InstallAdvice per model
#   layer = info.factory(in_features, out_features, bits, group_size, sym, bias,
#                        zero_offset=..., device=..., [scale_dtype=..., bias_dtype=...])
#   fill layer.qweight / qzeros / scales (/ bias) with the checkpoint tensors (GPTQ layout, or AWQ layout for
#   AWQ packings), call layer.post_init() once, then layer(x).  post_init() may repack into the kernel's own
#   layout and free the checkpoint buffers (they become empty tensors); forward before post_init raises.
#   info.compute_dtype (new, optional): the dtype a kernel computes in internally (None = activation dtype).
#   reconcile_dtype(...) picks the model's compute dtype for a device and the chosen kernels (see dtypes.py).
from . import native_cpu as _native_cpu  # noqa: E402
from .conversions import padded_group_layout as _padded  # noqa: E402
from .cpu_kernels import ArkAwqQuantLinear, ArkQuantLinear, AtenInt4QuantLinear, AtenInt8QuantLinear  # noqa: E402
from .device_kernels import (  # noqa: E402
    ExllamaV2AwqLinear, ExllamaV2Linear, HpuLinear, MarlinAwqLinear, MarlinLinear, TritonLinear,
)
from .dtypes import reconcile_dtype  # noqa: E402
from .native_cpu import NativeCpuAwqQuantLinear, NativeCpuQuantLinear  # noqa: E402
from .selector import InstallAdvice, backend_names  # noqa: E402

PACKINGS_GPTQ_V1 = ("auto_round:auto_gptq",)  # zp - 1
PACKINGS_AWQ = ("auto_round:auto_awq", "awq")
HALF_DTYPES = (torch.float16, torch.bfloat16)
GPTQMODEL = ("gptqmodel>=2.0",)
ARK = ("auto-round-lib>=0.16.0", "torch>=2.8.0")


def _group_multiple_of_32(spec: LayerSpec) -> str | None:
    gs, _, _ = _padded(spec.in_features, spec.group_size, multiple=32)
    return None if gs % 32 == 0 else f"group_size {spec.group_size} is not a multiple of 32"


def _whole_groups(spec: LayerSpec) -> str | None:
    if spec.group_size > 0 and spec.in_features % spec.group_size:
        return f"in_features {spec.in_features} is not a multiple of group_size {spec.group_size}"
    return None


def _multiples(in_mult: int, out_mult: int, whole_groups: bool = False):
    def check(spec: LayerSpec) -> str | None:
        if spec.in_features % in_mult or spec.out_features % out_mult:
            return f"needs in_features % {in_mult} == 0 and out_features % {out_mult} == 0"
        return _whole_groups(spec) if whole_groups else None

    return check


def _all(*checks):
    def check(spec: LayerSpec) -> str | None:
        return next((r for r in (c(spec) for c in checks) if r), None)

    return check


def _int4_shapes(spec: LayerSpec) -> str | None:
    if spec.out_features % 16:
        return "out_features must be a multiple of 16"
    return _group_multiple_of_32(spec)


def _int8_shapes(spec: LayerSpec) -> str | None:
    if spec.group_size > 0 and spec.group_size < spec.in_features:
        return "takes one group per row (group_size -1): torch's int8 op has per-channel scales only"
    return None


def _has_op(name: str):
    def check() -> str | None:
        return None if hasattr(torch.ops.aten, name) else f"this torch build lacks torch.ops.aten.{name}"

    return check


def _aten_slow() -> str | None:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "AVX512":
        return (f"not chosen automatically on this CPU ({cap}): torch's weight-only int4/int8 CPU ops are only "
                "vectorized for AVX512, elsewhere they run a scalar path far slower than fp32 dense; force it with "
                "its name")
    return None


def _habana() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("habana_frameworks") else "needs the Gaudi software stack (habana_frameworks)"


for _info in (
    KernelInfo(name="avx2", priority=7, devices=("cpu",), bits=(2, 3, 4, 8), packing_formats=PACKINGS_GPTQ_LAYOUT,
               factory=NativeCpuQuantLinear, shape_check=_group_multiple_of_32,
               runtime_check=_native_cpu.unavailable_reason, compute_dtype=torch.float32, aliases=("native",),
               description="this project's AVX2 C kernel (packed weights, fp32 compute, ragged groups padded)"),
    KernelInfo(name="avx2_awq", priority=7, devices=("cpu",), bits=(4,), packing_formats=PACKINGS_AWQ,
               factory=NativeCpuAwqQuantLinear, shape_check=_all(_group_multiple_of_32, _multiples(1, 8)),
               runtime_check=_native_cpu.unavailable_reason, compute_dtype=torch.float32,
               aliases=("avx2", "native"), description="avx2 kernel for AWQ-packed checkpoints"),
    KernelInfo(name="ark", priority=6, devices=("cpu",), bits=(2, 4, 8), packing_formats=PACKINGS_GPTQ_LAYOUT,
               factory=ArkQuantLinear, requires=ARK, compute_dtype=torch.float32, aliases=("auto_round_kernel",),
               description="auto-round-lib's CPU kernel (ragged groups padded)"),
    KernelInfo(name="ark_awq", priority=6, devices=("cpu",), bits=(4,), packing_formats=PACKINGS_AWQ,
               factory=ArkAwqQuantLinear, requires=ARK, compute_dtype=torch.float32, shape_check=_multiples(1, 8),
               aliases=("ark",), description="auto-round-lib's CPU kernel for AWQ-packed checkpoints"),
    KernelInfo(name="ark_xpu", priority=6, devices=("xpu",), bits=(4, 8), sym=(True,),
               packing_formats=PACKINGS_GPTQ_LAYOUT, factory=ArkQuantLinear, requires=ARK,
               shape_check=_whole_groups, aliases=("ark",), description="auto-round-lib's XPU kernel"),
    KernelInfo(name="marlin", priority=6, devices=("cuda",), bits=(4, 8), sym=(True,), group_sizes=(-1, 32, 64, 128),
               packing_formats=PACKINGS_GPTQ_LAYOUT, dtypes=HALF_DTYPES, factory=MarlinLinear, requires=GPTQMODEL,
               shape_check=_multiples(1, 64, whole_groups=True), aliases=("gptqmodel",),
               description="gptqmodel's Marlin kernel"),
    KernelInfo(name="marlin_awq", priority=6, devices=("cuda",), bits=(4,), sym=(True, False), group_sizes=(-1, 32, 64, 128),
               packing_formats=PACKINGS_AWQ, dtypes=(torch.float16,), factory=MarlinAwqLinear,
               requires=("gptqmodel>=5.6.0",), shape_check=_multiples(1, 64, whole_groups=True), aliases=("marlin",),
               description="gptqmodel's AWQ Marlin kernel"),
    KernelInfo(name="exllamav2", priority=5, devices=("cuda",), bits=(4,), group_sizes=(-1, 32, 64, 128),
               packing_formats=PACKINGS_GPTQ_LAYOUT, dtypes=HALF_DTYPES, factory=ExllamaV2Linear, requires=GPTQMODEL,
               shape_check=_multiples(32, 32, whole_groups=True), description="gptqmodel's ExLlamaV2 kernel"),
    KernelInfo(name="exllamav2_awq", priority=5, devices=("cuda",), bits=(4,), group_sizes=(-1, 32, 64, 128),
               packing_formats=PACKINGS_AWQ, dtypes=HALF_DTYPES, factory=ExllamaV2AwqLinear,
               requires=("gptqmodel>=5.6.0",), shape_check=_multiples(32, 32, whole_groups=True),
               aliases=("exllamav2",), description="gptqmodel's AWQ ExLlamaV2 kernel"),
    KernelInfo(name="torch_int4", priority=3, devices=("cpu",), bits=(2, 3, 4), packing_formats=PACKINGS_GPTQ_LAYOUT,
               factory=AtenInt4QuantLinear, shape_check=_int4_shapes, aliases=("aten",),
               runtime_check=_has_op("_weight_int4pack_mm_for_cpu"), slow_reason=_aten_slow,
               description="torch.ops.aten._weight_int4pack_mm_for_cpu (2/3/4-bit as 4-bit integers)"),
    KernelInfo(name="torch_int8", priority=3, devices=("cpu",), bits=(8,), packing_formats=PACKINGS_GPTQ_LAYOUT,
               factory=AtenInt8QuantLinear, shape_check=_int8_shapes, aliases=("aten",),
               runtime_check=_has_op("_weight_int8pack_mm"), slow_reason=_aten_slow,
               description="torch.ops.aten._weight_int8pack_mm (per-channel 8-bit)"),
    KernelInfo(name="triton", priority=2, devices=("cuda", "xpu"), bits=(2, 4, 8),
               packing_formats=PACKINGS_GPTQ_LAYOUT, dtypes=HALF_DTYPES, factory=TritonLinear,
               requires=GPTQMODEL + ("triton>=2.0",), shape_check=_multiples(32, 32, whole_groups=True),
               aliases=("tritonv2",), description="gptqmodel's Triton kernel"),
    KernelInfo(name="hpu", priority=0, devices=("hpu",), bits=(4,), packing_formats=PACKINGS_GPTQ_LAYOUT,
               dtypes=(torch.bfloat16,), factory=HpuLinear, shape_check=_multiples(1, 8), runtime_check=_habana,
               description="Gaudi: convert_from_uint4 + matmul"),
):
    register_kernel(_info)

__all__ += [
    "ArkQuantLinear", "ArkAwqQuantLinear", "AtenInt4QuantLinear", "AtenInt8QuantLinear", "InstallAdvice",
    "NativeCpuQuantLinear", "NativeCpuAwqQuantLinear", "backend_names", "reconcile_dtype",
]
