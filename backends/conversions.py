"""Packing conversions kernels need after loading.  Pure tensor code: imports no model code.

Everything here is a data/shape transformation that runs on any device (tested on CPU), so kernels for
devices the CI machine lacks (CUDA, XPU, Gaudi) still have their conversions proven:

- ``gptq_v1_to_v2_qzeros`` / ``gptq_v2_to_v1_qzeros``: the historic GPTQ ``zp - 1`` storage
  (``auto_round:auto_gptq``, ``auto_gptq``) versus the raw zero points that gptqmodel's kernels
  ("v2") and the ``auto_round`` packing store.
- ``unpack_awq_layer`` / ``awq_to_gptq``: AWQ words (packed along the output dimension with the
  ``[0, 2, 4, 6, 1, 3, 5, 7]`` interleave) to plain integers and to the GPTQ layout.
- ``padded_group_layout``: how a kernel that needs whole groups pads a ragged last group.
- ``marlin_scale_perm``/``marlin_permute_scales``: the scale reordering gptqmodel's Marlin kernel
  expects (facts from the public Marlin/gptqmodel sources; the weight tile repack itself runs on CUDA
  inside gptqmodel).
"""

from __future__ import annotations

import torch

from autoround.quantizer.formats.packing import pack_awq, pack_gptq_qzeros, pack_stream, unpack_awq, unpack_gptq_qzeros

# the AWQ word layout has one implementation, the formats' (``quantizer/formats/packing.py``); kernels use it
# under these names: int32 ``[rows, cols/8]`` words <-> uint8 ``[rows, cols]`` in natural column order
pack_awq_words = pack_awq
unpack_awq_words = unpack_awq


def gptq_v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """GPTQ v1 ``qzeros`` (zero points stored minus 1, wrapped) -> v2 (zero points as they are)."""
    z = unpack_gptq_qzeros(qzeros, bits, out_features).to(torch.int32)
    return pack_gptq_qzeros((z + 1) & ((1 << bits) - 1), bits)


def gptq_v2_to_v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of ``gptq_v1_to_v2_qzeros``."""
    z = unpack_gptq_qzeros(qzeros, bits, out_features).to(torch.int32)
    return pack_gptq_qzeros((z - 1) & ((1 << bits) - 1), bits)


def unpack_awq_layer(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ ``qweight [in, out/8]``, ``qzeros [groups, out/8]`` -> integers ``[in, out]``, zeros ``[groups, out]``."""
    return unpack_awq_words(qweight), unpack_awq_words(qzeros)


def awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, zero_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ words -> GPTQ-layout ``qweight [in/8, out]`` and ``qzeros [groups, out/8]`` (4-bit).

    ``zero_offset=1`` writes GPTQ v1 zeros (``zp - 1``), 0 writes raw zero points.
    """
    q, z = unpack_awq_layer(qweight, qzeros)
    z = (z.to(torch.int32) - zero_offset) & 0xF
    return pack_stream(q, 4).contiguous(), pack_gptq_qzeros(z, 4)


def padded_group_layout(in_features: int, group_size: int, multiple: int = 1) -> tuple[int, int, int]:
    """(padded group size, number of groups, padded in_features) for kernels that need whole groups.

    Every group, the ragged last one included, is padded to the same size; a single group (``-1``/``0``
    or ``group_size >= in_features``) is rounded up to ``multiple``.  Padding channels hold zero
    activations, so their weights never contribute.
    """
    if group_size in (-1, 0) or group_size >= in_features:
        gs = -(-in_features // multiple) * multiple
        return gs, 1, gs
    n_groups = -(-in_features // group_size)
    return group_size, n_groups, group_size * n_groups


def marlin_scale_perm() -> tuple[list[int], list[int]]:
    """(grouped, per-channel) permutations Marlin applies to each 64-column block of scales."""
    grouped = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return grouped, single


def marlin_permute_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Reorder ``scales [groups, out]`` the way Marlin's kernel reads them (out must be a multiple of 64)."""
    grouped, single = marlin_scale_perm()
    out = scales.shape[1]
    if out % 64:
        raise ValueError(f"Marlin needs out_features divisible by 64, got {out}")
    if group_size not in (-1, 0) and group_size < in_features:
        s = scales.reshape(-1, len(grouped))[:, grouped]
    else:
        s = scales.reshape(-1, len(single))[:, single]
    return s.reshape(-1, out).contiguous()
