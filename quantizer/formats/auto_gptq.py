"""The ``auto_gptq`` format (``quant_method: "gptq"``, GPTQ v1 layout) read by GPTQModel, transformers,
vLLM and SGLang.

Tensors per layer: ``qweight``/``qzeros`` (``zp - 1``)/``scales`` and ``g_idx`` (``i // group_size``, no
act-order).  Per-layer overrides are GPTQModel ``dynamic`` entries: ``"+:^name$": {"bits": 8, ...}`` for a
layer quantized differently, ``"-:^name$": {}`` for a layer left in float.  ``quantize_config.json`` holds
the same dict as ``config.json``'s ``quantization_config``.
"""

from __future__ import annotations

import re
from typing import Any

from . import ExportFormat, ExportJob, QuantizedLayer, autoround_version, group_size_of, register_format
from .auto_round import AutoRoundFormat, float_packing
from .packing import gptq_layer_tensors, unpack_gptq_qzeros
from .writer import save_format
from ..schemes import QuantScheme
from ...log import logger


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def wrapped_zero_points(layer: QuantizedLayer, weight: Any) -> int:
    """How many groups of ``layer``'s packed ``weight`` (a ``QuantizedWeight``) have zero point 0: none when
    symmetric."""
    return 0 if layer.scheme.sym else int((weight.zero == 0).sum())


def staged_wrapped_zero_points(job: ExportJob) -> int:
    """How many asymmetric groups of the layers streamed tuning staged already have zero point 0 (read from their
    packed ``qzeros``, where GPTQ v1's ``zp - 1`` of 0 is all ones)."""
    count = 0
    for name, packed in (job.staged or {}).items():
        layer = job.layers.get(name)
        if layer is None or layer.scheme.sym:
            continue
        bits = layer.scheme.bits
        zeros = unpack_gptq_qzeros(packed["qzeros"].load(), bits, layer.out_features)
        count += int((zeros == (1 << bits) - 1).sum())
    return count


@register_format
class AutoGPTQFormat(ExportFormat):
    name = "auto_gptq"
    description = "GPTQ (quant_method gptq, v1 zero points, g_idx); GPTQModel, transformers, vLLM, SGLang"
    lm_head = True
    tied_lm_head = False
    uniform = False
    model_free = True
    streams = True

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and float_packing(scheme) is not None:
            return f"auto_gptq packs integer weights, not {scheme.data_type!r}"
        return AutoRoundFormat().scheme_error(scheme)  # same integer layout, same limits

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        return AutoRoundFormat().shape_error(scheme, in_features, out_features)

    def layer_tensors(self, layer: QuantizedLayer) -> dict[str, Any]:
        return gptq_layer_tensors(layer.weight, zero_offset=1, g_idx=True)

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        default = job.scheme
        dynamic: dict[str, dict[str, Any]] = {}
        lm_head = False
        out = job.model.get_output_embeddings() if hasattr(job.model, "get_output_embeddings") else None
        for name, layer in job.layers.items():
            if out is not None and out is job.model.get_submodule(name):
                lm_head = True
            s = layer.scheme
            diff = {}
            if s.bits != default.bits:
                diff["bits"] = s.bits
            if group_size_of(layer) != (-1 if default.group_size in (-1, 0) else default.group_size):
                diff["group_size"] = group_size_of(layer)
            if s.sym != default.sym:
                diff["sym"] = s.sym
            if diff:
                dynamic["+:" + _exact(name)] = diff
        for name in job.float_layers:
            dynamic["-:" + _exact(name)] = {}
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": default.bits,
            "group_size": -1 if default.group_size in (-1, 0) else default.group_size,
            "sym": default.sym,
            "desc_act": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
            "lm_head": lm_head,
            "pack_dtype": "int32",
            "provider": "autoround",
            "autoround_version": autoround_version(),
            "block_name_to_quantize": ",".join(job.block_names),
        }
        if dynamic:
            config["dynamic"] = dynamic
        return config

    def save(self, job: ExportJob, output_dir: str) -> str:
        wrapped = [staged_wrapped_zero_points(job)]

        def tensors(layer: QuantizedLayer) -> dict[str, Any]:
            # counted as each layer is packed: the model-free route rounds a layer's weight each time it is asked for
            w = layer.weight
            wrapped[0] += wrapped_zero_points(layer, w)
            return gptq_layer_tensors(w, zero_offset=1, g_idx=True)

        qconfig = self.quantization_config(job)
        path = save_format(self, job, output_dir, tensors, qconfig, {"quantize_config.json": qconfig})
        if wrapped[0]:
            logger.warning(
                "auto_gptq: %d asymmetric groups have zero point 0, which the GPTQ v1 layout (zp - 1) stores as -1: "
                "readers that convert v1 to v2 by adding 1 to each packed word carry into the next value, and "
                "GPTQModel loads asymmetric v1 files only from its own quantizer; the auto_round format stores "
                "asymmetric weights exactly",
                wrapped[0],
            )
        return path
