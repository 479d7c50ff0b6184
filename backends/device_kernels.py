"""Thin adapters for kernels of accelerator devices: CUDA (gptqmodel's Marlin, ExLlamaV2, Triton),
XPU (Triton, ark) and Gaudi (HPU).

Each adapter keeps ``TorchQuantLinear``'s constructor and checkpoint buffers (so every loader fills it the
same way), and in ``post_init()`` converts the checkpoint tensors to what the maintained kernel expects
and hands them over.  The conversions are pure functions (``backends/conversions.py`` and
``hpu_pack_output_dim`` below), tested on CPU; the device runs themselves need the device.

Facts used (from the public gptqmodel/AutoRound sources):
- gptqmodel's kernels (Marlin, ExLlamaV2, TritonV2) take GPTQ-layout ``qweight``/``qzeros``/``scales``/
  ``g_idx`` with zero points in its internal "v2" form (stored as they are); ``auto_round:auto_gptq`` and
  ``auto_gptq`` checkpoints store ``zp - 1`` ("v1"), so the adapter converts.  ``post_init()`` of the
  gptqmodel module does its own repack (Marlin tiles, ExLlama shuffles).
- Marlin: symmetric 4/8-bit, groups -1/32/64/128, out_features % 64 == 0, in_features % group == 0,
  fp16/bf16.  ExLlamaV2: 4-bit, groups -1/32/64/128, in/out % 32 == 0.  Triton: 2/4/8-bit, in/out % 32.
- HPU (Gaudi): ``torch.ops.hpu.convert_from_uint4(qweight, scales, qzeros, dtype)`` dequantizes 4-bit
  integers packed along the OUTPUT dimension (8 per int32, least significant first, natural order) with
  raw zero points packed the same way; the layer then runs ``x @ W`` in bf16.
"""

from __future__ import annotations

import importlib

import torch

from .conversions import gptq_v1_to_v2_qzeros
from .torch_kernel import TorchQuantLinear
from autoround.quantizer.errors import BackendError
from autoround.quantizer.formats.packing import pack_stream, unpack_gptq_qzeros, unpack_stream


def hpu_pack_output_dim(qweight: torch.Tensor, qzeros: torch.Tensor, in_features: int, out_features: int,
                        zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ 4-bit ``qweight [in/8, out]``, ``qzeros [groups, out/8]`` -> HPU ``[in, out/8]``, ``[groups, out/8]``."""
    q = unpack_stream(qweight, 4, in_features)  # [in, out]
    z = (unpack_gptq_qzeros(qzeros, 4, out_features).to(torch.int32) + zero_offset) & 0xF  # raw zp
    return pack_stream(q.t(), 4).t().contiguous(), pack_stream(z.t(), 4).t().contiguous()


class _DelegatingLinear(TorchQuantLinear):
    """Holds checkpoint buffers until ``post_init()`` builds the maintained kernel's module."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inner: torch.nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            raise RuntimeError(f"{self.kernel_name} kernel: call post_init() after loading the weights")
        return self.inner(x)


class GptqModelLinear(_DelegatingLinear):
    """Adapter over a gptqmodel ``nn_modules.qlinear`` class (chosen by ``module``/``class_names``)."""

    kernel_name = "gptqmodel"
    module = "gptqmodel.nn_modules.qlinear.torch"
    class_names: tuple[str, ...] = ("TorchLinear", "TorchQuantLinear")  # gptqmodel >= 7 names first

    @classmethod
    def kernel_class(cls) -> type:
        try:
            mod = importlib.import_module(cls.module)
        except ImportError as exc:
            raise BackendError(f"{cls.kernel_name} kernel needs gptqmodel: {exc}") from exc
        for name in cls.class_names:
            if hasattr(mod, name):
                return getattr(mod, name)
        raise BackendError(f"{cls.module} has none of {cls.class_names}; unsupported gptqmodel version")

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors gptqmodel's module expects (v2 zero points, trivial g_idx)."""
        qzeros = self.qzeros
        if self.zero_offset:
            qzeros = gptq_v1_to_v2_qzeros(qzeros, self.bits, self.out_features)
        return {
            "qweight": self.qweight,
            "qzeros": qzeros,
            "scales": self.scales.to(torch.float16),
            "g_idx": self.group_index().to(torch.int32),
        }

    def post_init(self) -> None:
        if self.inner is not None:
            return
        cls = self.kernel_class()
        inner = cls(
            bits=self.bits, group_size=self.group_size, desc_act=False, sym=self.sym,
            in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
            **self.ctor_kwargs,
        ).to(self.qweight.device)
        with torch.no_grad():
            for name, tensor in self.checkpoint_tensors().items():
                getattr(inner, name).copy_(tensor)
            if self.bias is not None:
                inner.bias.copy_(self.bias)
        self.finish(inner)
        self.inner = inner

    ctor_kwargs: dict = {}

    def finish(self, inner: torch.nn.Module) -> None:
        """gptqmodel's own repack (Marlin tiles, ExLlama shuffles) once the checkpoint tensors are in."""
        inner.post_init()


class MarlinLinear(GptqModelLinear):
    kernel_name = "marlin"
    module = "gptqmodel.nn_modules.qlinear.marlin"
    class_names = ("MarlinLinear", "MarlinQuantLinear")


# ExLlamaV2 dequantizes large inputs into a scratch buffer whose raw pointer each layer keeps: one buffer per device,
# shared by every layer there (they run one after the other), as gptqmodel sizes it; grown by replacing it when a
# larger layer comes, each layer holding a reference to the buffer its pointer is into
_EXLLAMA_SCRATCH: dict = {}


class ExllamaV2Linear(GptqModelLinear):
    kernel_name = "exllamav2"
    module = "gptqmodel.nn_modules.qlinear.exllamav2"
    class_names = ("ExllamaV2Linear", "ExllamaV2QuantLinear")

    def finish(self, inner: torch.nn.Module) -> None:
        from gptqmodel.utils.exllamav2 import ScratchSpace

        need, device = inner.temp_dq_size(), inner.qweight.device
        space = _EXLLAMA_SCRATCH.get(device)
        if space is None or space.scratch_bytes < need:
            space = _EXLLAMA_SCRATCH[device] = ScratchSpace(need, device)
        self.scratch_space = space  # the kernel keeps a raw pointer into it
        inner.post_init(scratch_space=space)


class TritonLinear(GptqModelLinear):
    kernel_name = "triton"
    module = "gptqmodel.nn_modules.qlinear.tritonv2"
    class_names = ("TritonV2Linear", "TritonV2QuantLinear")


class _AwqGptqModelLinear(GptqModelLinear):
    """gptqmodel's AWQ kernels take the AWQ checkpoint tensors as they are (raw zero points); their modules create
    their tensors only when asked to (``register_buffers=True``)."""

    ctor_kwargs = {"register_buffers": True}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales.to(torch.float16)}


def _awq(base: type, name: str, module: str, class_names: tuple[str, ...]) -> type:
    from .cpu_kernels import AwqLayout

    return type(base.__name__.replace("Linear", "AwqLinear"), (AwqLayout, _AwqGptqModelLinear),
                {"kernel_name": name, "module": module, "class_names": class_names, "finish": base.finish})


MarlinAwqLinear = _awq(MarlinLinear, "marlin_awq", "gptqmodel.nn_modules.qlinear.marlin_awq",
                       ("AwqMarlinLinear", "AwqMarlinQuantLinear"))
ExllamaV2AwqLinear = _awq(ExllamaV2Linear, "exllamav2_awq", "gptqmodel.nn_modules.qlinear.exllamav2_awq",
                          ("AwqExllamaV2Linear", "AwqExllamaV2QuantLinear"))


class HpuLinear(_DelegatingLinear):
    """4-bit on Gaudi: repack along the output dimension, dequantize with ``convert_from_uint4``, matmul."""

    kernel_name = "hpu"

    def post_init(self) -> None:
        if self.inner is not None:
            return
        try:
            import habana_frameworks.torch.hpu  # noqa: F401  (registers torch.ops.hpu)
        except ImportError as exc:
            raise BackendError("hpu kernel needs the Gaudi software stack (habana_frameworks)") from exc
        qweight, qzeros = hpu_pack_output_dim(
            self.qweight.cpu(), self.qzeros.cpu(), self.in_features, self.out_features, self.zero_offset
        )
        self.qweight, self.qzeros = qweight.to(self.scales.device), qzeros.to(self.scales.device)
        self.inner = torch.nn.Identity()  # marks the layer ready

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            raise RuntimeError("hpu kernel: call post_init() after loading the weights")
        w = torch.ops.hpu.convert_from_uint4(self.qweight, self.scales, self.qzeros, x.dtype)
        y = torch.matmul(x.reshape(-1, self.in_features), w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)
