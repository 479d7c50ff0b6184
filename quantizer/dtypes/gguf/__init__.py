"""GGUF (ggml) block quantization as a weight family: the type table (``types``), one module per kind of block
type holding its packing, quantizer and dequantizer side by side (``legacy``: q4_0..q8_0, ``kquants``: q2_k..q6_k,
``iq4_nl``), SignRound in the block structure (``tune``), and the family object the registry dispatches to
(``family``).  Pure tensor code: no model code.

Whole tensors: ``quantize_tensor`` cuts a float ``[rows, cols]`` weight into blocks and returns uint8
``[rows, cols / block_size * type_size]`` in ggml's layout; ``importance`` (an importance matrix = per-input-
channel mean of squared activations, as llama.cpp's imatrix) switches from the reference quantizer to the
importance-weighted search, whose error weights are ``imatrix * sqrt(sigma2 + x**2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import iq4_nl, kquants, legacy
from .blocks import _bytes_f16, pack_kscales, pack_q3_scales, unpack_kscales, unpack_q3_scales  # noqa: F401
from .iq4_nl import KVALUES_IQ4NL  # noqa: F401
from .kquants import pack_q2_k, pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k  # noqa: F401
from .legacy import pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0  # noqa: F401
from .types import (  # noqa: F401
    GGML_TYPES, GGUF_FILE_TYPES, GROUP_MAX_EPS, QK_K, QUANT_TYPES, GGMLType, GGUFFileType, fit_row, tensor_type,
    use_more_bits,
)

# block type -> (quantize(x, qw, sigma2) -> blocks, dequantize(blocks) -> x), from each codec module
CODECS = {**legacy.CODECS, **kquants.CODECS, **iq4_nl.CODECS}
QUANTIZERS = {name: codec[0] for name, codec in CODECS.items()}


def dequantize_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 ``[nb, type_size]`` blocks of ``qtype`` -> float32 ``[nb, block_size]``."""
    if qtype not in CODECS:
        raise ValueError(f"no dequantizer for ggml type {qtype!r}")
    return CODECS[qtype][1](b)


# ---------------------------------------------------------------------------------------------------------
# whole tensors

_CHUNK_ELEMS = 1 << 21


def quantize_tensor(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A float ``[rows, cols]`` weight -> uint8 ``[rows, cols / block_size * type_size]`` in ggml layout.

    ``importance`` (``[cols]``, >= 0; e.g. mean squared activations per input channel) switches from the
    reference quantizer to the importance-weighted search; float types ignore it."""
    t = GGML_TYPES[qtype]
    w = w.detach().to("cpu", torch.float32).contiguous()
    rows, cols = w.shape
    if t.is_float:
        if qtype == "f32":
            return w.view(torch.uint8).reshape(rows, cols * 4)
        dtype = torch.float16 if qtype == "f16" else torch.bfloat16
        return w.to(dtype).view(torch.uint8).reshape(rows, cols * 2)
    if cols % t.block_size:
        raise ValueError(f"a row of {cols} values is not a multiple of the {qtype} block size {t.block_size}")
    fn = QUANTIZERS[qtype]
    nbr = cols // t.block_size
    imp = None
    if importance is not None:
        imp = importance.detach().to("cpu", torch.float32).reshape(1, cols)
        if imp.numel() != cols:
            raise ValueError(f"importance has {imp.numel()} values for rows of {cols}")
    out = torch.empty(rows, nbr * t.type_size, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMS // cols)
    for r in range(0, rows, step):
        x = w[r : r + step]
        n = x.shape[0]
        blocks = x.reshape(n * nbr, t.block_size)
        qw = sigma2 = None
        if imp is not None:
            qw = imp.expand(n, cols).reshape(n * nbr, t.block_size)
            sigma2 = (x * x).sum(-1, keepdim=True) / cols  # llama.cpp: per row, for the 32-blocks types
            sigma2 = sigma2.repeat_interleave(nbr, dim=0)
        out[r : r + n] = fn(blocks, qw, sigma2).reshape(n, nbr * t.type_size)
    return out


def dequantize_tensor(data: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[rows, row_bytes]`` -> float32 ``[rows, cols]``."""
    t = GGML_TYPES[qtype]
    rows, cols = shape
    data = data.contiguous()
    if qtype == "f32":
        return data.view(torch.float32).reshape(rows, cols).clone()
    if qtype in ("f16", "bf16"):
        dtype = torch.float16 if qtype == "f16" else torch.bfloat16
        return data.view(dtype).reshape(rows, cols).to(torch.float32)
    blocks = data.reshape(-1, t.type_size)
    return dequantize_blocks(blocks, qtype).reshape(rows, cols)


@dataclass
class GGUFWeight:
    """A weight quantized to a ggml type: the raw blocks (``[out, row_bytes]`` uint8) and its shape.

    Stands where integer formats keep a ``qmath.QuantizedWeight``: ``dequantize()`` gives the float weight
    that the GGUF file decodes to."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]

    @property
    def bits(self) -> int:
        return GGML_TYPES[self.qtype].bits

    def dequantize(self) -> torch.Tensor:
        return dequantize_tensor(self.data, self.qtype, self.shape)
