"""transformers integration: ``AutoRoundConfig`` and the ``HfQuantizer`` that loads AutoRound checkpoints
through this project's quantized linear layers.

``register()`` (run by ``import autoround``) makes transformers use these classes for every
``quant_method: "auto-round"`` checkpoint, whether or not Intel's ``auto_round`` package is installed, and
lets ``from_pretrained(..., quantization_config=AutoRoundConfig())`` load GPTQ checkpoints too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import AutoRoundConfig as _HfAutoRoundConfig
from transformers.utils.quantization_config import QuantizationMethod

from autoround.backends import InstallAdvice, reconcile_dtype, select_kernel
from autoround.memory import release_host_memory
from autoround.quantizer.errors import AutoRoundError, ModelLoadError, SchemeError
from autoround.quantizer.model_io import linear_dims
from autoround.quantizer.moe import fused_experts, unfuse_experts
from autoround.quantizer.transforms.rotation import install_input_rotation

from .checkpoint_config import CheckpointQuantConfig
from .engine_common import checkpoint_tensor_names, layer_spec
from .log import logger

BACKENDS = ("auto", "torch")
# the scale tensors of every packed layout (GPTQ/AWQ/MLX ``scales``; MX/NVFP4/FP8 ``weight_scale``; FP8 blocks)
SCALE_TENSORS = ("scales", "weight_scale", "weight_scale_inv")


class AutoRoundConfig(_HfAutoRoundConfig):
    """Loading configuration for AutoRound checkpoints (``quant_method: "auto-round"``).

    Pass it to ``from_pretrained(..., quantization_config=AutoRoundConfig(backend="auto"))``; the
    checkpoint's own settings (bits, group_size, sym, packing_format, extra_config, ...) are kept and only
    the loading attributes (``backend``) come from the object passed.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(bits=bits, group_size=group_size, sym=sym, backend=backend, **kwargs)

    def post_init(self) -> None:
        from autoround import backends as _backends

        valid = tuple(_backends.backend_names())
        if self.backend not in valid:
            raise SchemeError(f"backend={self.backend!r} is not known; valid backends: {', '.join(valid)}")
        if getattr(self, "packing_format", None) == "auto_round:gptq":  # transformers' default spelling
            self.packing_format = "auto_round:auto_gptq"
        # validates bits/group_size/sym and the packing, with messages that list the valid choices
        self.checkpoint_config()

    def checkpoint_config(self) -> CheckpointQuantConfig:
        return CheckpointQuantConfig.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config_dict = dict(config_dict)
        method = str(config_dict.get("quant_method", "auto-round"))
        if method == "gptq":
            if config_dict.get("desc_act"):
                raise SchemeError(
                    "GPTQ checkpoints with desc_act=True (act-order) are not supported by the AutoRound loader"
                )
            if config_dict.get("checkpoint_format", config_dict.get("format", "gptq")) not in ("gptq", None):
                raise SchemeError(
                    f"GPTQ checkpoint_format {config_dict.get('checkpoint_format', config_dict.get('format'))!r} "
                    "is not supported; only 'gptq' (v1)"
                )
            config_dict["packing_format"] = "auto_round:auto_gptq"
            config_dict["source_quant_method"] = "gptq"
        elif method == "awq":
            version = str(config_dict.get("version", "gemm")).lower()
            if version != "gemm":
                raise SchemeError(
                    f"AWQ version {version!r} is not supported by the AutoRound loader; supported: 'gemm'"
                )
            config_dict["packing_format"] = "awq"
            config_dict["source_quant_method"] = "awq"
            config_dict["bits"] = config_dict.get("bits") or config_dict.get("w_bit") or 4
            config_dict["group_size"] = config_dict.get("group_size") or config_dict.get("q_group_size") or 128
            config_dict["sym"] = not config_dict.get("zero_point", True)
        elif method != "auto-round":
            raise SchemeError(
                f"quant_method {method!r} cannot be loaded with AutoRoundConfig; supported: 'auto-round', 'gptq', 'awq'"
            )
        config_dict["quant_method"] = QuantizationMethod.AUTOROUND
        config = cls(**config_dict)
        if return_unused_kwargs:
            return config, kwargs
        for key, value in kwargs.items():
            setattr(config, key, value)
        return config


def _checkpoint_tensor_names(model: nn.Module) -> set[str] | None:
    """Names of the tensors in the checkpoint being loaded, when it is a local folder; else None."""
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return checkpoint_tensor_names(path)


def _shorten(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _device_type(device_map: Any) -> str:
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        values = {str(v) for v in device_map.values()}
        dev = sorted(values)[0] if values else "cpu"
    else:
        dev = str(device_map)
    if dev in ("auto", "balanced", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.isdigit():
        return "cuda"
    return torch.device(dev).type


class AutoRoundQuantizer(HfQuantizer):
    """Loads pre-quantized AutoRound (and, via ``AutoRoundConfig``, GPTQ) checkpoints."""

    requires_calibration = True

    def __init__(self, quantization_config: AutoRoundConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, AutoRoundConfig):
            quantization_config = AutoRoundConfig.from_dict(quantization_config.to_dict())
        super().__init__(quantization_config, **kwargs)
        self.device_type = "cpu"
        self.used_kernels: Counter[str] = Counter()
        self.dtype_note = ""

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Reconcile the requested compute dtype with the device and kernels (e.g. no fp16 on a plain CPU)."""
        ckpt = self.quantization_config.checkpoint_config()
        d = ckpt.default
        spec = layer_spec(d, ckpt.packing_format, 4096, 4096, self.device_type, dtype)
        backend = getattr(self.quantization_config, "backend", "auto")
        chosen, self.dtype_note = reconcile_dtype(self.device_type, dtype, spec, backend)
        return chosen

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.device_type = _device_type(kwargs.get("device_map"))

    def update_device_map(self, device_map: Any) -> Any:
        return {"": "cpu"} if device_map is None else device_map

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise AutoRoundError(
                "AutoRoundConfig loads checkpoints that are already quantized; to quantize a float model use "
                "autoround.AutoRound(model, scheme=...).quantize_and_save(output_dir)"
            )
        ckpt = self.quantization_config.checkpoint_config()
        present = _checkpoint_tensor_names(model)
        dtype = getattr(model.config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        backend = getattr(self.quantization_config, "backend", "auto")
        # MoE experts written expert by expert (``quantizer/moe.py``): the model gets one module per expert first
        fused = {n for n, _ in fused_experts(model)}
        if fused:
            prefixes = {n: f"{n}.0." for n in fused}
            per_expert = {n for n, p in prefixes.items() if present is None or any(k.startswith(p) for k in present)}
            unfuse_experts(model, check=False, only=per_expert)
        advice = InstallAdvice()
        replaced = 0
        missing: list[str] = []
        for name, module in list(model.named_modules()):
            dims = linear_dims(module)  # nn.Linear, or GPT-2's Conv1D
            if dims is None:
                continue
            in_features, out_features = dims
            scheme = ckpt.scheme_for(name)
            if scheme.is_float:
                continue
            spec = layer_spec(scheme, ckpt.packing_format, in_features, out_features, self.device_type, dtype)
            if present is not None:
                # every layout has scales; a layer without them was kept in float by the writer (e.g. its
                # shape cannot be packed) and keeps its float ``weight``
                if not any(f"{name}.{s}" in present for s in SCALE_TENSORS) and f"{name}.weight" in present:
                    continue
            kernel = select_kernel(spec, backend, advice)
            extra = {"scheme": scheme} if getattr(kernel.factory, "takes_scheme", False) else {}
            with torch.device("meta"):
                qlinear = kernel.factory(
                    in_features,
                    out_features,
                    scheme.bits,
                    scheme.group_size,
                    scheme.sym,
                    bias=module.bias is not None,
                    zero_offset=ckpt.zero_offset,
                    bias_dtype=dtype,
                    **extra,
                )
            if present is not None:
                wanted = list(qlinear.checkpoint_tensors) + (["bias"] if module.bias is not None else [])
                missing += [f"{name}.{t}" for t in wanted if f"{name}.{t}" not in present]
            if ckpt.rotation is not None and ckpt.rotation.hadamard_type == "random_hadamard":
                # the layer's rotation matrix R, stored with it (the input is rotated by it after loading)
                bs = ckpt.rotation.block_size
                qlinear.register_buffer("hadamard_matrix", torch.empty(bs, bs, dtype=torch.float32, device="meta"))
                if present is not None and f"{name}.hadamard_matrix" not in present:
                    missing.append(f"{name}.hadamard_matrix")
            if present is not None and f"{name}.g_idx" in present:
                # GPTQ group index: loaded, then checked to be the trivial i // group_size (no act-order)
                qlinear.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device="meta"))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, qlinear)
            if not any(True for _ in parent.parameters(recurse=False)):
                # some _init_weights (GPT-2's) reach into children's .weight, which quantized layers do not have;
                # a parent without parameters of its own has nothing else to initialize
                parent._is_hf_initialized = True
            self.used_kernels[kernel.name] += 1
            replaced += 1
        if missing:
            raise ModelLoadError(f"the checkpoint is missing quantized tensors: {_shorten(missing)}")
        if replaced == 0:
            raise ModelLoadError(
                "no quantized layer found in this checkpoint: its quantization_config names blocks "
                f"{list(ckpt.block_names)} but no matching linear layer has packed weights"
            )
        advice.emit()  # one warning per model when a better kernel only lacks a package
        logger.info(
            "AutoRound loader: %d quantized layers, kernels %s, compute dtype %s%s", replaced,
            dict(self.used_kernels), str(dtype).replace("torch.", ""), f" ({self.dtype_note})" if self.dtype_note else "",
        )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        missing = []
        rotation = self.quantization_config.checkpoint_config().rotation
        fixed = rotation.matrix() if rotation is not None and rotation.hadamard_type == "hadamard" else None
        for name, module in model.named_modules():
            if hasattr(module, "kernel_name"):
                for bname, buf in module.named_buffers(recurse=False):
                    if buf is not None and buf.is_meta:
                        missing.append(f"{name}.{bname}")
                if not missing:
                    _check_g_idx(name, module)
                    module.post_init()
                    if rotation is not None:  # x -> x Rᵀ per block before the layer (the weight is stored rotated)
                        r = fixed if fixed is not None else module.hadamard_matrix
                        _check_rotation(name, r, rotation.block_size)
                        install_input_rotation(module, r)
        if missing:
            raise ModelLoadError(f"the checkpoint is missing quantized tensors: {_shorten(missing)}")
        release_host_memory()

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_rotation(name: str, r: torch.Tensor, block_size: int) -> None:
    eye = torch.eye(block_size, dtype=torch.float64)
    if tuple(r.shape) != (block_size, block_size) or not torch.allclose(r.double() @ r.double().T, eye, atol=1e-4):
        raise ModelLoadError(
            f"{name}.hadamard_matrix is not an orthonormal {block_size} x {block_size} matrix (shape "
            f"{tuple(r.shape)}): the checkpoint's rotation cannot be undone"
        )


def _check_g_idx(name: str, module: nn.Module) -> None:
    g_idx = getattr(module, "g_idx", None)
    if g_idx is None:
        return
    expected = module.group_index().to(g_idx.device)
    if not torch.equal(g_idx.to(torch.int64), expected.to(torch.int64)):
        raise ModelLoadError(
            f"{name}.g_idx is not the plain i // group_size order (the checkpoint was quantized with act-order); "
            "such GPTQ checkpoints are not supported by the AutoRound loader"
        )


_REGISTERED = False


def register() -> None:
    """Make transformers load every ``quant_method: "auto-round"`` checkpoint through this project."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto as hf_auto

    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["auto-round"] = AutoRoundConfig
    hf_auto.AUTO_QUANTIZER_MAPPING["auto-round"] = AutoRoundQuantizer
    # merge_quantization_configs converts a checkpoint's dict with the AutoRoundConfig class it imported,
    # so GPTQ checkpoints passed with our AutoRoundConfig are converted by our from_dict
    hf_auto.AutoRoundConfig = AutoRoundConfig
    _REGISTERED = True


register()  # whoever imports this module (``autoround.AutoRoundConfig``, the import hook) gets it registered
