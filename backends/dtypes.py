"""Reconciling a model's compute dtype with the device and the kernels that will run it.

Decision (documented in README/docs): on a CPU, half precision is only kept where the CPU does that math
natively (oneDNN reports bf16/fp16 support: AVX512-BF16/AMX/AVX512-FP16).  Elsewhere an fp16 or bf16
request computes in fp32: without native support half-precision math takes slow paths (docs/benchmarks.md has
the numbers), and fp32 holds every fp16/bf16 value exactly, so nothing is lost.  fp16 is never forced on a CPU.  On CUDA/XPU
a request the best kernel cannot take (e.g. fp32 with the half-only Marlin) moves to the kernel's first
half dtype; Gaudi kernels compute in bf16.
"""

from __future__ import annotations

import torch

from .selector import LayerSpec, kernels

HALF = (torch.float16, torch.bfloat16)


def cpu_native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU does ``dtype`` matmuls natively (oneDNN's own check)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return True


def reconcile_dtype(device: str, requested: torch.dtype, spec: LayerSpec | None = None,
                    backend: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype to compute in, why).  ``spec`` is a representative layer (the checkpoint's default scheme)."""
    if requested not in (torch.float32, *HALF):
        return requested, f"{requested} as requested"
    if device == "cpu":
        if requested in HALF and not cpu_native_half(requested):
            return torch.float32, (f"{requested} requested, computing in float32: this CPU has no native "
                                   f"{str(requested).replace('torch.', '')} math (it would run many times slower)")
        return requested, f"{requested} as requested"
    if device == "hpu":
        return torch.bfloat16, "Gaudi kernels compute in bfloat16"
    if spec is not None:
        from dataclasses import replace

        for k in kernels():
            if backend != "auto" and not k.matches(backend):
                continue
            probe = replace(spec, act_dtype=k.dtypes[0])
            if k.can_implement(probe)[0]:
                if requested in k.dtypes:
                    return requested, f"{requested} as requested ({k.name} kernel)"
                return k.dtypes[0], f"{requested} requested, the {k.name} kernel computes in {k.dtypes[0]}"
    return requested, f"{requested} as requested"
