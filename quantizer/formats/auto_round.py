"""The ``auto_round`` checkpoint format (``quant_method: "auto-round"``) with its three packings.

- ``auto_round:auto_gptq`` (every layer symmetric): the GPTQ layout with the historic ``zp - 1`` zero point.
- ``auto_round:auto_awq`` (every layer asymmetric 4-bit with whole groups): the AWQ interleaved layout, as
  the reference tool writes asymmetric 4-bit by default.
- ``auto_round`` (anything else, e.g. asymmetric 2/3/8-bit or mixed): the GPTQ layout, zero points as is.
(``auto_round:mlx``, MLX's packing, is its own format module: ``formats/mlx.py``.)

Low-bit float weights, with the packings the reference tool (0.16.1) writes for them; ``data_type`` and the
``act_*`` keys of the config say what the tensors hold:

- ``auto_round:llm_compressor`` (MXFP4, MXFP8 and their RCEIL variants, NVFP4): compressed-tensors' tensors,
  ``weight_packed`` uint8 ``[out, in/2]`` (E2M1 codes, even column in the low nibble) or ``weight``
  float8_e4m3fn (MXFP8), ``weight_scale`` uint8 E8M0 ``[out, in/32]`` (MX) or float8_e4m3fn ``[out, in/16]``
  (NVFP4) with ``weight_global_scale`` float32 ``[1]`` (the divisor ``448·6/amax``) and, for NVFP4 activations,
  ``input_global_scale`` float32 ``[1]`` from the calibration data.
- ``auto_round`` with ``data_type: "mx_int"`` (MXINT4): ``weight_packed`` as above holding sign-magnitude codes
  (bit 3 the sign, bits 0-2 k of k/4), ``weight_scale`` uint8 E8M0.
- ``auto_round:fp8_static`` (FP8 per tensor or per channel: FPW8A16, FP8_STATIC): ``weight`` float8_e4m3fn,
  ``weight_scale`` ``[out]`` or ``[1]``, ``input_scale`` ``[1]`` (calibrated max / 448) for static activations.
- ``auto_round:fp8`` (FP8 in 2-D blocks: FP8_BLOCK): ``weight`` float8_e4m3fn, ``weight_scale_inv``
  ``[ceil(out/128), ceil(in/128)]`` (DeepSeek-V3's name; it holds the multiplier amax / 448).
FP8 scales are written in float32 (the reference writes the model's dtype; its loader converts either).

Per-layer settings that differ from the default go to ``extra_config``; layers left in float get
``{"bits": 16}`` there; layers outside the quantized blocks (a quantized ``lm_head``) get their full scheme.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExportFormat, ExportJob, QuantizedLayer, autoround_version, register_format
from .packing import PACK_BITS, awq_layer_tensors, awq_whole_groups, gptq_layer_tensors, mx_nv_tensors
from .writer import save_format
from ..dtypes import family_of
from ..dtypes.floats import fp8_static_input_scale, nvfp4_global_scale
from ..errors import FormatError
from ..schemes import QuantScheme

PACKING_GPTQ = "auto_round:auto_gptq"
PACKING_AWQ = "auto_round:auto_awq"
PACKING_RAW_ZP = "auto_round"
PACKING_MLX = "auto_round:mlx"  # the ``auto_round:mlx`` format (``formats/mlx.py``); its checkpoints say "mlx"
PACKING_MXNV = "auto_round:llm_compressor"  # MXFP / NVFP4 in compressed-tensors' tensor layout
PACKING_FP8 = "auto_round:fp8_static"  # FP8 per tensor / channel
PACKING_FP8_BLOCK = "auto_round:fp8"  # FP8 in 2-D blocks (weight_scale_inv)
FLOAT_PACKINGS = (PACKING_MXNV, PACKING_FP8, PACKING_FP8_BLOCK)
# packing formats as spelled by other writers (and by the other quant methods we load), mapped to ours
PACKING_ALIASES = {
    "auto_round:gptq": PACKING_GPTQ,
    "auto_round:auto_gptq": PACKING_GPTQ,
    "auto_gptq": PACKING_GPTQ,
    "gptq": PACKING_GPTQ,
    "auto_round:auto_awq": PACKING_AWQ,
    "auto_round:awq": PACKING_AWQ,
    "auto_awq": PACKING_AWQ,
    "awq": PACKING_AWQ,
    "auto_round": PACKING_RAW_ZP,
    "auto_round:zp": PACKING_RAW_ZP,
    "mlx": PACKING_MLX,
    "auto_round:mlx": PACKING_MLX,
    PACKING_MXNV: PACKING_MXNV,
    PACKING_FP8: PACKING_FP8,
    PACKING_FP8_BLOCK: PACKING_FP8_BLOCK,
}


def float_packing(scheme: QuantScheme) -> str | None:
    """The packing the reference tool writes ``scheme``'s float weights in; None for integer weights."""
    family = family_of(scheme).name
    if family not in ("mx", "nvfp", "fp8"):
        return None
    if family == "mx" and scheme.data_type == "mx_int":
        return PACKING_RAW_ZP
    if family == "fp8":
        return PACKING_FP8_BLOCK if isinstance(scheme.group_size, tuple) else PACKING_FP8
    return PACKING_MXNV


def float_weights_error(scheme: QuantScheme) -> str | None:
    """Why the reference's float packings cannot hold ``scheme`` (MX/NVFP4/FP8 weights), or None."""
    family = family_of(scheme).name
    if scheme.act_bits < 16:
        act = scheme.act_scheme()
        if family_of(act).name != family:
            return (f"{scheme.data_type} weights are written with {family.upper()} activations only, not "
                    f"{act.data_type!r}")
    return None


def float_shape_error(scheme: QuantScheme, in_features: int) -> str | None:
    """Why a layer of ``in_features`` inputs cannot hold ``scheme``'s float weights (whole weight and activation
    groups), or None; the compressed-tensors and fp8 layouts have the same limits."""
    gs = scheme.group_size
    if isinstance(gs, int) and gs > 0 and in_features % gs:
        return f"{in_features} input channels are not a whole number of groups of {gs}"
    if scheme.act_bits < 16 and scheme.act_group_size > 0 and in_features % scheme.act_group_size:
        return f"{in_features} input channels are not a whole number of activation groups"
    return None


def scheme_record(scheme: QuantScheme) -> dict[str, Any]:
    """The scheme's keys as a float checkpoint's config spells them (resolved activation type, lists for blocks)."""
    out: dict[str, Any] = {
        "bits": scheme.bits,
        "group_size": list(scheme.group_size) if isinstance(scheme.group_size, tuple) else scheme.group_size,
        "sym": scheme.sym,
        "data_type": scheme.data_type,
        "act_bits": scheme.act_bits,
    }
    if scheme.act_bits < 16:
        act = scheme.act_scheme()
        out.update(act_group_size=scheme.act_group_size, act_sym=scheme.act_sym, act_data_type=act.data_type,
                   act_dynamic=scheme.act_dynamic)
    return out


def float_layer_tensors(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """A float-family layer's tensors in the reference's auto_round packings (see the module docstring)."""
    qw, scheme = layer.weight, layer.scheme
    family = family_of(scheme).name
    if family in ("mx", "nvfp"):
        out = mx_nv_tensors(qw, family)
        if family == "nvfp" and scheme.act_bits < 16:
            out["input_global_scale"] = nvfp4_global_scale(layer.input_amax)
        return out
    out = {"weight": qw.codes.view(torch.float8_e4m3fn)}
    scale = qw.scale.to(torch.float32)
    if isinstance(scheme.group_size, tuple):
        out["weight_scale_inv"] = scale.contiguous()
        return out
    out["weight_scale"] = scale.reshape(-1).contiguous()
    if scheme.act_bits < 16 and not scheme.act_dynamic:
        out["input_scale"] = fp8_static_input_scale(layer.input_amax)
    return out


def zero_offset(packing_format: str) -> int:
    """What the format subtracts from a zero point before storing it (GPTQ v1 stores zp - 1)."""
    return 1 if PACKING_ALIASES.get(packing_format, packing_format) == PACKING_GPTQ else 0


def awq_packable(layer: QuantizedLayer) -> bool:
    s = layer.scheme
    gs = s.group_size
    return s.bits == 4 and not s.sym and awq_whole_groups(gs, layer.in_features) and layer.out_features % 8 == 0


def _in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


@register_format
class AutoRoundFormat(ExportFormat):
    name = "auto_round"
    description = ("AutoRound (quant_method auto-round): GPTQ or AWQ int packing (transformers, vLLM, SGLang); MXFP, "
                   "NVFP4, MXINT4 and FP8 in the reference's packings (transformers)")
    lm_head = True
    tied_lm_head = True
    uniform = False
    model_free = True
    streams = True
    moe_experts = "unfused"  # our transformers loader unfuses the model it builds
    rotation = True  # rotation_config + (random_hadamard) each layer's hadamard_matrix, as the reference writes

    def scheme_error(self, scheme: QuantScheme) -> str | None:
        # MX/NV/FP8 packings record their activations; the integer layouts are weight-only
        if not scheme.is_float and scheme.act_bits < 16 and float_packing(scheme) is None:
            return (f"auto_round holds integer weights weight-only and cannot record the activation quantization of "
                    f"{scheme.describe()}; INT8_W8A8-style checkpoints are written by format llm_compressor")
        return self.weights_error(scheme)

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if float_packing(scheme) is not None:
            return float_weights_error(scheme)
        if scheme.data_type != "int":
            return f"auto_round stores integer weights, not {scheme.data_type!r}"
        if scheme.bits not in PACK_BITS:
            return (
                f"{scheme.bits}-bit weights cannot be packed in the GPTQ layout that auto_round uses; "
                f"valid bits: {', '.join(map(str, PACK_BITS))}"
            )
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        if float_packing(scheme) is not None:
            return float_shape_error(scheme, in_features)
        if in_features % 32 or out_features % 32:
            return f"[{out_features} x {in_features}] is not a multiple of 32 in both dimensions"
        return None

    def mix_error(self, schemes: "list[QuantScheme]") -> str | None:
        quantized = [s for s in schemes if not s.is_float]
        if len({float_packing(s) or "int" for s in quantized}) > 1:
            kinds = sorted({f"{s.data_type} ({float_packing(s) or 'integer GPTQ layout'})" for s in quantized})
            return (f"one auto_round checkpoint has one packing, but these layers need {', '.join(kinds)}; give them "
                    "one weight family (layer_config / AutoScheme options) or use format llm_compressor or fake")
        return None

    def packing_for(self, job: ExportJob) -> str:
        layers = list(job.layers.values())
        floats = {float_packing(layer.scheme) for layer in layers}
        if floats != {None}:
            err = self.mix_error([layer.scheme for layer in layers])
            if err:
                raise FormatError(err)
            return floats.pop()
        if all(layer.scheme.sym for layer in layers):
            return PACKING_GPTQ
        if all(awq_packable(layer) for layer in layers):
            return PACKING_AWQ
        return PACKING_RAW_ZP

    def layer_tensors(self, layer: QuantizedLayer, packing: str = PACKING_GPTQ) -> dict[str, torch.Tensor]:
        if float_packing(layer.scheme) is not None:
            out = float_layer_tensors(layer)
        elif packing == PACKING_AWQ:
            out = awq_layer_tensors(layer.weight)
        else:
            out = gptq_layer_tensors(layer.weight, zero_offset(packing))
        if layer.rotation is not None and layer.rotation.hadamard_type == "random_hadamard":
            out["hadamard_matrix"] = layer.rotation.matrix().to(torch.float32)
        return out

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        default = job.scheme
        packing = self.packing_for(job)
        if packing in FLOAT_PACKINGS or float_packing(default) is not None:
            record = scheme_record
        else:
            def record(scheme: QuantScheme) -> dict[str, Any]:
                return {k: getattr(scheme, k) for k in ("bits", "group_size", "sym", "data_type")}
        base = record(default)
        extra: dict[str, dict[str, Any]] = {}
        for name, layer in job.layers.items():
            mine = record(layer.scheme)
            if _in_blocks(name, job.block_names):
                diff = {k: v for k, v in mine.items() if base.get(k) != v}
            else:  # e.g. lm_head: readers quantize only the blocks unless told otherwise
                diff = mine
            if diff:
                extra[name] = diff
        for name in job.float_layers:
            extra[name] = {"bits": 16, "data_type": "float"}
        config: dict[str, Any] = {
            "quant_method": "auto-round",
            "packing_format": packing,
            **base,
            "act_bits": default.act_bits,
            "block_name_to_quantize": ",".join(job.block_names),
            "autoround_version": autoround_version(),
            "provider": "autoround",
        }
        if family_of(default).name == "fp8" and not default.is_float:  # the keys the reference's FP8 writer adds
            config["fmt"] = "e4m3"
            config["activation_scheme"] = "static" if default.act_bits < 16 and not default.act_dynamic else "dynamic"
            if isinstance(default.group_size, tuple):
                config["weight_block_size"] = list(default.group_size)
        config.update(job.settings)
        rotations = {layer.rotation for layer in job.layers.values() if layer.rotation is not None}
        if len(rotations) > 1:
            raise FormatError(f"one checkpoint holds one rotation_config; these layers have {len(rotations)}")
        if rotations:
            config["rotation_config"] = rotations.pop().record()
        if extra:
            config["extra_config"] = extra
        return config

    def tensor_writer(self, job: ExportJob) -> Any:
        packing = self.packing_for(job)
        return lambda layer: self.layer_tensors(layer, packing)

    def save(self, job: ExportJob, output_dir: str) -> str:
        writer = self.tensor_writer(job)
        qconfig = self.quantization_config(job)
        return save_format(self, job, output_dir, writer, qconfig, {"quantization_config.json": qconfig})


class _FixedPacking(AutoRoundFormat):
    """``auto_round`` with the packing named in the format (``--format auto_round:auto_gptq``) instead of the one
    the schemes pick; a scheme that packing cannot hold is refused before any work."""

    packing: str

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and float_packing(scheme) is not None:
            return f"{self.name} packs integer weights; {scheme.data_type} weights are written by format auto_round"
        return super().weights_error(scheme)

    def packing_for(self, job: ExportJob) -> str:  # type: ignore[override]
        return self.packing


@register_format
class AutoRoundGptqPacking(_FixedPacking):
    name = PACKING_GPTQ
    description = "AutoRound with the GPTQ packing (zero point - 1, as GPTQ v1) for every layer: symmetric weights"
    packing = PACKING_GPTQ

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and not scheme.sym:
            return ("auto_round:auto_gptq stores zero point - 1 (GPTQ v1), which cannot hold an asymmetric zero "
                    "point of 0; use format auto_round (or auto_round:auto_awq for 4 bits)")
        return super().weights_error(scheme)


@register_format
class AutoRoundAwqPacking(_FixedPacking):
    name = PACKING_AWQ
    description = "AutoRound with the AWQ packing for every layer: 4-bit weights in whole groups"
    packing = PACKING_AWQ

    def weights_error(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_float and scheme.data_type == "int" and scheme.bits != 4:
            return f"auto_round:auto_awq packs 4-bit weights only, not {scheme.bits}-bit; use format auto_round"
        return super().weights_error(scheme)

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        gs = scheme.group_size
        if not awq_whole_groups(gs, in_features):
            return f"{in_features} input features are not a whole number of groups of {gs} (AWQ packing)"
        return super().shape_error(scheme, in_features, out_features)
