"""The pure-torch kernel for low-bit float weights (MXFP4/MXFP8/MXINT4, NVFP4, FP8) in the reference tool's
``auto_round`` packings (``formats/auto_round.py`` lists the tensors).  Each call rebuilds the weight with the
data-type registry's own ``FloatQuantizedWeight.dequantize`` (float32), quantizes the input as the checkpoint's
activation scheme says (dynamic scales per call; static ones from ``input_scale`` / ``input_global_scale``), then
runs the matmul in the activation dtype.  Its results equal the fake-quantized model that was exported.
"""

from __future__ import annotations

import torch
from torch import nn

from autoround.quantizer.act_quant import act_qdq, quantizes_acts
from autoround.quantizer.dtypes import family_of
from autoround.quantizer.dtypes.minifloat import E4M3, FloatQuantizedWeight
from autoround.quantizer.formats.packing import e8m0_scale, unpack_nibbles
from autoround.quantizer.schemes import QuantScheme

from .torch_kernel import TorchQuantLinear


class TorchFloatQuantLinear(TorchQuantLinear):
    """MX / NVFP4 / FP8 weights dequantized per call, activations quantized as the checkpoint's scheme."""

    kernel_name = "torch_float"
    takes_scheme = True  # the loader passes the layer's QuantScheme (the data type is not in the int signature)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: "int | tuple[int, int]",
        sym: bool,
        bias: bool,
        zero_offset: int = 0,
        scale_dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        scheme: QuantScheme | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if scheme is None or family_of(scheme).name == "int":
            raise ValueError("TorchFloatQuantLinear needs the layer's MX / NVFP4 / FP8 scheme (scheme=...)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.zero_offset = bits, group_size, sym, zero_offset
        self.scheme, self.family = scheme, family_of(scheme)
        shape = (out_features, in_features)
        self.layout = self.family.layout(scheme, shape)
        rows, cols = self.layout.n_scales(shape)
        names: list[str] = []

        def buf(name: str, size: tuple[int, ...], dtype: torch.dtype) -> None:
            self.register_buffer(name, torch.zeros(size, dtype=dtype, device=device))
            names.append(name)

        fam = self.family.name
        if bits == 4:
            if in_features % 2:
                raise ValueError(f"4-bit elements are packed two to a byte: {in_features} input channels is odd")
            buf("weight_packed", (out_features, in_features // 2), torch.uint8)
        else:
            buf("weight", shape, torch.float8_e4m3fn)
        if fam == "mx":
            buf("weight_scale", (rows, cols), torch.uint8)
        elif fam == "nvfp":
            buf("weight_scale", (rows, cols), torch.float8_e4m3fn)
            buf("weight_global_scale", (1,), torch.float32)
            if quantizes_acts(scheme):
                buf("input_global_scale", (1,), torch.float32)
        elif isinstance(group_size, tuple):
            buf("weight_scale_inv", (rows, cols), scale_dtype)
        else:
            buf("weight_scale", (rows * cols,), scale_dtype)
            if quantizes_acts(scheme) and not scheme.act_dynamic:
                buf("input_scale", (1,), scale_dtype)
        self.checkpoint_tensors = tuple(names)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, "
                f"bias={self.bias is not None}, kernel={self.kernel_name}")

    def quantized_weight(self) -> FloatQuantizedWeight:
        fam = self.family.name
        codes = unpack_nibbles(self.weight_packed) if self.bits == 4 else self.weight.view(torch.uint8)
        rows, cols = self.layout.n_scales((self.out_features, self.in_features))
        global_scale = None
        if fam == "mx":
            scale = e8m0_scale(self.weight_scale)
        elif fam == "nvfp":
            scale = self.weight_scale.to(torch.float32)
            global_scale = self.weight_global_scale.to(torch.float32)
        else:
            stored = self.weight_scale_inv if isinstance(self.group_size, tuple) else self.weight_scale
            scale = stored.to(torch.float32).reshape(rows, cols)
        return FloatQuantizedWeight(codes, scale, self.family.element(self.scheme).name, self.bits,
                                    (self.layout.rows, self.layout.cols), self.scheme.data_type, global_scale)

    def int_weight(self) -> torch.Tensor:
        raise NotImplementedError("float weights have element codes, not integers: see quantized_weight()")

    def zeros(self) -> torch.Tensor:
        raise NotImplementedError("float weights have no zero points")

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[in, out]`` (the base class's orientation)."""
        return self.quantized_weight().dequantize().t().to(dtype)

    def act_static(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(calibrated amax, global scale) of a static activation scheme, from the stored tensors."""
        if hasattr(self, "input_global_scale"):
            return None, self.input_global_scale.to(torch.float32)
        if hasattr(self, "input_scale"):
            return self.input_scale.to(torch.float32) * E4M3.max, None  # (amax / 448) * 448 gives amax back
        return None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if quantizes_acts(self.scheme):
            amax, global_scale = self.act_static()
            x = act_qdq(x, self.scheme, amax, global_scale=global_scale)
        w = self.quantized_weight().dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)
