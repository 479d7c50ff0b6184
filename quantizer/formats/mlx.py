"""Apple's MLX layout, in two formats.

- ``mlx``: a native mlx-lm checkpoint (``mlx_lm.load(folder)``).  config.json carries the ``quantization`` block
  mlx-lm reads (``group_size``, ``bits``, ``mode: "affine"``, then one entry per layer that differs: its own
  ``{"group_size", "bits"}``, or ``false`` for a layer kept in float), mirrored as ``quantization_config`` as
  mlx-lm's own writer does.
- ``auto_round:mlx``: the same tensors and ``quantization`` block, plus an AutoRound ``quantization_config``
  (``quant_method: "auto-round"``, ``packing_format: "mlx"``, ``extra_config`` per layer, as the reference
  writes it), so transformers loads it through this project's loader and mlx-lm loads it too.

Tensors per quantized layer (``packing.mlx_layer_tensors``): ``weight`` uint32 ``[out, in * bits / 32]``,
``scales`` and ``biases`` ``[out, groups]``; float16 unless the checkpoint is float32 (then float32, which keeps
asymmetric zero points exact).  MLX quantizes 2, 3, 4, 5, 6 and 8 bits in groups of 32, 64 or 128 whole input
channels: a layer whose input size is not a whole number of groups stays float (and is marked ``false``).  The
embedding stays float.  mlx-lm reads ``rope_theta`` (and ``rope_scaling``) at the top level of config.json,
where transformers 5 writes ``rope_parameters``: both are written.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import ExportFormat, ExportJob, QuantizedLayer, register_format
from .auto_round import AutoRoundFormat
from .packing import MLX_BITS, MLX_GROUP_SIZES, mlx_layer_tensors
from .writer import save_format
from ..schemes import QuantScheme

MLX_MODE = "affine"


def mlx_scheme_error(scheme: QuantScheme, fmt: str) -> str | None:
    if scheme.is_float:
        return None
    if scheme.data_type != "int":
        return f"{fmt} stores integer (affine) weights, not {scheme.data_type!r}"
    if scheme.bits not in MLX_BITS:
        return f"MLX quantizes {', '.join(map(str, MLX_BITS))}-bit weights, not {scheme.bits}-bit"
    if scheme.group_size not in MLX_GROUP_SIZES:
        what = {-1: "one group per output row (-1)", 0: "one group per tensor (0)"}.get(
            scheme.group_size, f"group_size {scheme.group_size}"
        )
        return (
            f"MLX quantizes in groups of {', '.join(map(str, MLX_GROUP_SIZES))} input channels, not {what}; "
            "pass group_size=32, 64 or 128"
        )
    if scheme.act_bits < 16:
        return f"{fmt} holds weight-only schemes (A16), not {scheme.act_bits}-bit activations"
    return None


def mlx_shape_error(scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
    if scheme.is_float:
        return None
    if in_features % scheme.group_size:
        return (
            f"{in_features} input channels are not a whole number of groups of {scheme.group_size} "
            "(MLX needs whole groups)"
        )
    return None


def scale_dtype(job: ExportJob) -> torch.dtype:
    """float32 scales and biases for a float32 checkpoint, float16 otherwise (as mlx-lm and the reference)."""
    dtype = job.dtype
    if dtype is None:
        dtype = next((p.dtype for p in job.model.parameters() if p.is_floating_point()), torch.float16)
    return torch.float32 if dtype == torch.float32 else torch.float16


def mlx_quantization(job: ExportJob) -> dict[str, Any]:
    """The ``quantization`` block of config.json that mlx-lm reads."""
    default = job.scheme
    block: dict[str, Any] = {"group_size": default.group_size, "bits": default.bits, "mode": MLX_MODE}
    for name, layer in job.layers.items():
        s = layer.scheme
        if (s.bits, s.group_size) != (default.bits, default.group_size):
            block[name] = {"group_size": s.group_size, "bits": s.bits}
    for name in job.float_layers:
        block[name] = False
    return block


def mlx_config_updates(job: ExportJob) -> dict[str, Any]:
    """What mlx-lm needs in config.json beyond transformers' own keys."""
    updates: dict[str, Any] = {"quantization": mlx_quantization(job)}
    rope = getattr(job.model.config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        updates["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            updates["rope_scaling"] = dict(rope)
    return updates


class _MlxLayout(ExportFormat):
    lm_head = True
    tied_lm_head = True
    uniform = False
    model_free = False
    streams = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
        return mlx_scheme_error(scheme, self.name)

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        return mlx_shape_error(scheme, in_features, out_features)

    def layer_tensors(self, layer: QuantizedLayer, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        return mlx_layer_tensors(layer.weight, dtype)

    def tensor_writer(self, job: ExportJob) -> Callable[[QuantizedLayer], dict[str, torch.Tensor]]:
        dtype = scale_dtype(job)  # the checkpoint's float dtype, so streamed tuning packs as ``save`` does
        return lambda layer: self.layer_tensors(layer, dtype)

    def _save(self, job: ExportJob, output_dir: str, qconfig: dict[str, Any], extra: dict | None = None) -> str:
        return save_format(
            self, job, output_dir, self.tensor_writer(job), qconfig, extra, config_updates=mlx_config_updates(job),
        )


@register_format
class MlxFormat(_MlxLayout):
    name = "mlx"
    description = "MLX (mlx-lm's affine quantization: uint32 weight, scales, biases; 2-8 bit, groups 32/64/128)"

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        return mlx_quantization(job)  # mlx-lm writes its block under both keys

    def save(self, job: ExportJob, output_dir: str) -> str:
        return self._save(job, output_dir, self.quantization_config(job))


@register_format
class AutoRoundMlxFormat(_MlxLayout):
    name = "auto_round:mlx"
    description = "AutoRound with MLX packing (quant_method auto-round, packing mlx); transformers and mlx-lm"

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        config = AutoRoundFormat().quantization_config(job)
        config["packing_format"] = "mlx"  # the reference's spelling; read back as auto_round.PACKING_MLX
        return config

    def save(self, job: ExportJob, output_dir: str) -> str:
        qconfig = self.quantization_config(job)
        return self._save(job, output_dir, qconfig, {"quantization_config.json": qconfig})
