"""Export formats: one module per format behind one small protocol, registered by name.

This package is a leaf: kernels and integrations may import it (for the packing layouts and config keys);
it imports nothing from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..errors import FormatError
from ..qmath import ROUND_WITH_COMPUTED, QuantizedWeight
from ..schemes import QuantScheme


@dataclass
class QuantizedLayer:
    """One quantized linear layer ready for export."""

    name: str
    scheme: QuantScheme
    weight: QuantizedWeight
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    # the largest |input| seen in calibration, for schemes whose activation scale is static (``act_quant``)
    input_amax: torch.Tensor | None = None
    # the layer's input rotation (``transforms.rotation.RotationSpec``): ``weight`` is the rotated weight
    rotation: Any = None
    # a dynamic activation scale's tuned (max, min) clip ratios (``AR_ENABLE_ACT_MINMAX_TUNING``): applied in memory,
    # carried by no format
    act_ratio: tuple[float, float] | None = None


@dataclass
class ExportJob:
    """Everything a format needs to write a checkpoint."""

    model: Any  # transformers.PreTrainedModel holding float (or fake-quantized) weights
    layers: Mapping[str, QuantizedLayer]
    scheme: QuantScheme  # the default scheme; layers that differ go to per-layer overrides
    block_names: list[str]
    float_layers: list[str] = field(default_factory=list)  # quantizable layers deliberately kept in float
    tokenizer: Any = None
    settings: dict[str, Any] = field(default_factory=dict)  # tuning settings worth recording
    dtype: torch.dtype | None = None  # dtype of the float tensors in the checkpoint
    # the model-free route (``quantizer/model_free.py``): ``model`` is a meta-device skeleton, the float tensors
    # are read from the source files only when the writer reaches them, and so is each layer's weight
    float_tensors: Mapping[str, torch.Tensor] | None = None
    max_shard_bytes: int | None = None  # None: the writer's default
    # source tensors the model class never instantiates (MTP layers, ...): name -> safetensors file, copied as stored
    source_tensors: Mapping[str, str] = field(default_factory=dict)
    # streamed tuning (``quantizer/streaming.py``): each layer's tensors as packed when its block finished, held
    # on disk (layer name -> suffix -> ``writer.FileSlice``); those layers' ``weight`` is then None
    staged: Mapping[str, Mapping[str, Any]] | None = None


class ExportFormat:
    """Base class of an export format: one subclass per format module, registered with ``register_format``.
    The defaults below are what a format that does not override them means."""

    name: ClassVar[str]
    description: ClassVar[str]
    # whether the format can hold a quantized output projection (lm_head), and whether it can when the
    # model ties it to the input embedding (the checkpoint is then written untied)
    lm_head: ClassVar[bool] = False
    tied_lm_head: ClassVar[bool] = False
    # True: every quantized layer must share one scheme (no per-layer overrides other than float)
    uniform: ClassVar[bool] = False
    # True: the format can be written by the model-free route (plain RTN streamed from the source files,
    # ``quantizer/model_free.py``); it then sees a meta-device skeleton as ``job.model``
    model_free: ClassVar[bool] = False
    # True: a model with no quantized layer is a valid export (a float GGUF file)
    float_model_ok: bool = False
    # True: the format records an online input rotation (``transforms.rotation``) for its loader to apply
    rotation: ClassVar[bool] = False
    # True: each rotated layer is written with its rotation folded back into its own weight (any set of layers)
    folds_rotation: ClassVar[bool] = False
    # True: a float checkpoint written under the tensor names ``save_pretrained`` writes (transformers' load-time
    # renames and fusions reverted: MoE experts per expert, ...), so readers other than transformers 5 read it
    original_names: ClassVar[bool] = False
    # how the format writes MoE experts that the load stage unfused (``moe.py``): "unfused" (one set of layers
    # per expert), "fused" (back into the model class's 3-D parameters), or None (it cannot)
    moe_experts: ClassVar[str | None] = None
    # True: the format's tensors are ``tensor_writer(job)(layer)`` per layer and its config reads only the layers'
    # schemes and shapes, so streamed tuning can pack each block's layers as soon as the block is tuned
    streams: ClassVar[bool] = False
    # which scale plain RTN rounds integer weights with (``qmath.ROUNDING_SCALES``): the float32 one, as the
    # reference's default plain-RTN route writes auto_round / GPTQ / AWQ packings (its model-free route under
    # torch.compile), or the stored fp16 one, the nearest integer for the scale the checkpoint keeps
    rtn_rounding: ClassVar[str] = ROUND_WITH_COMPUTED

    def adapt_scheme(self, scheme: QuantScheme, switch: bool = True) -> QuantScheme:
        """The scheme this format needs instead of ``scheme`` (``switch`` False: raise ``FormatError`` rather
        than switch); by default ``scheme`` itself."""
        return scheme

    # True: the format records activation quantization (schemes with act_bits < 16)
    activations: ClassVar[bool] = False

    def scheme_error(self, scheme: QuantScheme) -> str | None:
        """Why this format cannot hold ``scheme`` at all (checked before any work), or None."""
        if not scheme.is_float and scheme.act_bits < 16 and not self.activations:
            return (f"{self.name} writes weight-only checkpoints and cannot record the activation quantization "
                    f"(act_bits={scheme.act_bits}) of {scheme.describe()}")
        return self.weights_error(scheme)

    def weights_error(self, scheme: QuantScheme) -> str | None:
        """Why this format cannot hold ``scheme``'s weights (checked before any work), or None."""
        raise NotImplementedError

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        """Why a layer of this shape cannot be packed (the layer is then kept in float), or None."""
        return None

    def mix_error(self, schemes: "list[QuantScheme]") -> str | None:
        """Why these per-layer schemes (each one holdable) cannot share one checkpoint of this format, or None."""
        return None

    def layer_tensors(self, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
        """Tensors replacing ``<name>.weight`` (suffix -> tensor), bias excluded."""
        raise NotImplementedError

    def tensor_writer(self, job: ExportJob) -> Callable[[QuantizedLayer], dict[str, torch.Tensor]]:
        """What ``save`` packs each layer of ``job`` with (``layer_tensors`` with the job's choices bound: the
        packing, the scales' dtype); it reads only the schemes and shapes of ``job.layers``."""
        return self.layer_tensors

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        """The ``quantization_config`` dict for config.json."""
        raise NotImplementedError

    def save(self, job: ExportJob, output_dir: str) -> str:
        """Write the checkpoint to ``output_dir`` atomically and return its path."""
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register_format(cls: type) -> type:
    if not issubclass(cls, ExportFormat):
        raise TypeError(f"{cls.__name__} must subclass formats.ExportFormat to be registered")
    _REGISTRY[cls.name] = cls
    return cls


_BUILTIN = ("auto_round", "auto_gptq", "auto_awq", "llm_compressor", "fake", "gguf", "mlx", "fp8")


def _load_builtin() -> None:
    import importlib

    for module in _BUILTIN:  # each module registers its format(s); a missing optional one is skipped
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


def formats_supporting(scheme: QuantScheme) -> list[str]:
    """Names of the registered formats that can hold ``scheme``."""
    _load_builtin()
    return [name for name, cls in _REGISTRY.items() if cls().scheme_error(scheme) is None]


def autoround_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoround")
    except PackageNotFoundError:
        return "0+unknown"


def group_size_of(layer: QuantizedLayer) -> int:
    """The group size as GPTQ/AWQ configs spell it: -1 for one group per row (also for per-tensor)."""
    gs = layer.scheme.group_size
    return -1 if gs in (-1, 0) or gs >= layer.in_features else gs


def list_formats() -> dict[str, str]:
    _load_builtin()
    return {name: cls.description for name, cls in _REGISTRY.items()}


def get_format(name: str) -> ExportFormat:
    _load_builtin()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise FormatError(f"unknown format {name!r}; valid formats: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]()


def parse_formats(spec: str | list[str]) -> list[ExportFormat]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise FormatError(f"no export format given; valid formats: {', '.join(list_formats())}")
    return [get_format(n) for n in dict.fromkeys(names)]


def export(
    fmt: ExportFormat,
    model: "torch.nn.Module",
    layers: Mapping[str, QuantizedLayer],
    plan: Any,
    default: QuantScheme,
    block_names: list[str],
    output_dir: str,
    tokenizer: Any,
    settings: dict[str, Any],
    float_tensors: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int | None = None,
    source_tensors: Mapping[str, str] | None = None,
    staged: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Write one format's checkpoint of the quantized ``layers`` (``plan``: the ``plan.LayerPlan`` whose
    ``keep_float`` layers are written in float).  ``float_tensors``/``max_shard_bytes``: the model-free route's streamed
    source tensors and shard size (``model`` is then its meta-device skeleton); ``staged``: streamed tuning's
    packed layers (``ExportJob.staged``)."""
    job = ExportJob(
        model=model,
        layers=layers,
        scheme=default,
        block_names=block_names,
        float_layers=plan.keep_float,
        tokenizer=tokenizer,
        settings=settings,
        float_tensors=float_tensors,
        max_shard_bytes=max_shard_bytes,
        source_tensors=dict(source_tensors or {}),
        staged=staged,
    )
    return fmt.save(job, output_dir)
