"""Loading the model to quantize (local folder, hub id, loaded model, GGUF file) and finding its blocks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from ..log import logger

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_safetensors(folder: Path) -> None:
    """Open every safetensors file's header so a corrupt file fails with its name, before a long load."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # reading one tensor checks that the data really covers the header's offsets
                    handle.get_slice(keys[-1])
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"model weights file {f} is corrupt or truncated ({exc}); re-download or re-save the model"
            ) from None
        if f.stat().st_size < 8:
            raise ModelLoadError(f"model weights file {f} is empty or truncated; re-download or re-save the model")


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading GGUF file %s (dequantized to %s)", path, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the 'gguf' package: pip install gguf ({exc})") from None
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from None
    # the result is a plain float model: forget that it came from a GGUF file
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tok


def load_model(
    model: "str | nn.Module",
    tokenizer: Any = None,
    dtype: "torch.dtype | str" = "auto",
    device_map: Any = None,
) -> tuple[nn.Module, Any]:
    """Return ``(model, tokenizer)`` for a local folder, a hub id, a GGUF file path or a loaded model."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(model, nn.Module):
        if not isinstance(model, PreTrainedModel):
            logger.warning("model is a %s, not a transformers PreTrainedModel; saving may fail", type(model).__name__)
        return model, tokenizer
    if not isinstance(model, (str, Path)):
        raise ModelLoadError(
            f"model must be a folder, a hub id, a .gguf file or a loaded model, got {type(model).__name__}"
        )
    path = Path(str(model)).expanduser()
    load_kw: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        load_kw["device_map"] = device_map
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        gguf_dtype = torch.float32 if dtype == "auto" else dtype
        m, tok = _from_gguf(path, gguf_dtype)
        return m, tokenizer if tokenizer is not None else tok
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json; is it a transformers model folder?")
        check_safetensors(path)
        try:
            m, info = _auto_class(path).from_pretrained(str(path), output_loading_info=True, **load_kw)
        except Exception as exc:
            raise ModelLoadError(f"could not load the model in {path}: {exc}") from None
        m._autoround_unexpected_keys = sorted(info.get("unexpected_keys") or [])  # for uninstantiated_tensors
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        return m, tokenizer
    looks_local = str(model).startswith((".", "/", "~")) or path.parent != Path(".") and path.parent.exists()
    if looks_local or not _HUB_ID.match(str(model)):
        raise ModelLoadError(f"model folder {path} does not exist; pass an existing folder, a .gguf file or a hub id")
    return _from_hub(str(model), tokenizer, load_kw)


def _auto_class(path: Path) -> Any:
    """AutoModelForCausalLM, or for a vision-language model (a config it does not map) AutoModelForImageTextToText."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception:
        return AutoModelForCausalLM  # its own error says what is wrong
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def uninstantiated_tensors(source: Any, model: nn.Module) -> dict[str, str]:
    """Tensors of a local safetensors folder that the loaded model holds no place for (DeepSeek-V3-style
    multi-token-prediction layers the class skips on purpose, or keys it does not know): name -> file.  A key
    counts when it is not one of the model's own state-dict names and either matches the class's
    ``_keys_to_ignore_on_load_unexpected`` patterns or was reported unexpected by transformers (so keys that
    transformers renamed or fused while loading are not copied)."""
    if not isinstance(source, (str, Path)) or not Path(str(source)).expanduser().is_dir():
        return {}
    import re

    from safetensors import safe_open

    folder = Path(str(source)).expanduser()
    files = sorted(folder.glob("*.safetensors"))
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = set(getattr(model, "_autoround_unexpected_keys", ()) or ())
    state = set(model.state_dict())
    out: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in state or key.endswith(("rotary_emb.inv_freq", "position_ids")):
                    continue
                if any(p.search(key) for p in patterns) or key in unexpected:
                    out[key] = str(file)
    return out


def load_tokenizer(folder: "str | Path") -> Any:
    """The tokenizer saved in a model folder, or None (with a warning) when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        logger.warning("no tokenizer found in %s (%s); pass tokenizer=... for text calibration data", folder, exc)
        return None


def _from_hub(repo_id: str, tokenizer: Any, load_kw: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading %s from the Hugging Face hub", repo_id)
    try:
        m = AutoModelForCausalLM.from_pretrained(repo_id, **load_kw)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "If this machine is offline, download the model elsewhere and pass its local folder instead, "
            "e.g. AutoRound('/path/to/model_folder') or auto-round --model /path/to/model_folder"
        ) from None
    return m, tokenizer


def _block_lists(model: nn.Module) -> list[tuple[int, str]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            has_linear = any(linear_dims(x) is not None for x in module[0].modules())
            if len(classes) == 1 and has_linear:
                found.append((len(module), name))
    return found


def _decoder_prefix(model: nn.Module) -> str | None:
    """The name of the text decoder inside a multimodal model (``model.language_model``), or None when the model
    is its own decoder or has no separate one."""
    body = decoder_body(model)
    if body is model:
        return None
    return next((n for n, m in model.named_modules() if m is body), None)


def find_block_names(model: nn.Module) -> list[str]:
    """Names of the ModuleLists holding the repeated decoder blocks (e.g. ``["model.layers"]``); in a multimodal
    model, those of its text decoder (``get_decoder()``), never the vision or audio towers."""
    best = _block_lists(model)
    prefix = _decoder_prefix(model)
    if prefix:
        text = [(n, name) for n, name in best if name.startswith(prefix + ".")]
        if not text and best:
            raise ModelLoadError(
                f"could not find the decoder blocks of {type(model).__name__}'s text decoder ({prefix}); pass "
                "to_quant_block_names=... naming the block list to quantize"
            )
        best = text
    if not best:
        raise ModelLoadError(
            f"could not find the repeated decoder blocks of {type(model).__name__}: no ModuleList of identical "
            "blocks that contain linear layers"
        )
    top = max(n for n, _ in best)
    names = [name for n, name in best if n == top]
    # keep outermost lists only
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def nontext_block_names(model: nn.Module) -> list[str]:
    """The block lists of a multimodal model outside its text decoder (vision / audio towers, projectors'
    blocks): what ``quant_nontext_module=True`` adds."""
    prefix = _decoder_prefix(model)
    if not prefix:
        return []
    names = [name for _, name in _block_lists(model) if not name.startswith(prefix + ".")]
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def decoder_body(model: nn.Module) -> nn.Module:
    """The model without its vocabulary projection (``get_decoder()``), or the model itself.

    Calibration passes need hidden states, not logits, and the projection is a large share of the work on
    small models."""
    return getattr(model, "get_decoder", lambda: None)() or model


def quantizable_linears(model: nn.Module, block_names: list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the blocks, by full name."""
    out: dict[str, nn.Linear] = {}
    for block in block_names:
        root = model.get_submodule(block)
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear):
                out[f"{block}.{name}"] = module
    return out


_FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The module between the last decoder block and the output projection (the final norm; identity if none).

    Used to feed the lm_head its real inputs when it is tuned after the blocks."""
    body = decoder_body(model)
    for root in (body, getattr(body, "decoder", None)):
        if root is None:
            continue
        for name in _FINAL_NORMS:
            mod = getattr(root, name, None)
            if isinstance(mod, nn.Module):
                if getattr(root, "project_out", None) is not None:
                    return nn.Sequential(mod, root.project_out)
                return mod
    raise ModelLoadError(
        f"quant_lm_head: cannot find the final norm of {type(model).__name__} (looked for "
        f"{', '.join(_FINAL_NORMS)} on {type(body).__name__}); keep quant_lm_head off for this model"
    )


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 family,
    weight stored transposed as [in, out]); None for anything else."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    conv = _conv1d_type()
    if conv is not None and type(module) is conv:
        return module.weight.shape[0], module.nf
    return None


def conv1d_to_linear(model: nn.Module, block_names: list[str]) -> list[str]:
    """Replace every ``Conv1D`` inside the blocks by an equivalent ``nn.Linear`` (weight transposed), so the
    quantizer sees one kind of layer; returns the replaced names (for :func:`linear_to_conv1d`)."""
    conv = _conv1d_type()
    if conv is None:
        return []
    names = []
    for block in block_names:
        for name, module in list(model.get_submodule(block).named_modules()):
            if type(module) is not conv:
                continue
            full = f"{block}.{name}"
            in_f, out_f = module.weight.shape
            lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device=module.weight.device,
                            dtype=module.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(module.weight.t())
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            _set_module(model, full, lin)
            names.append(full)
    return names


def linear_to_conv1d(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`conv1d_to_linear` (keeping the current, possibly fake-quantized, weights)."""
    conv = _conv1d_type()
    for full in names:
        lin = model.get_submodule(full)
        c = conv(lin.out_features, lin.in_features)
        c.to(device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            c.weight.copy_(lin.weight.t())
            if lin.bias is not None:
                c.bias.copy_(lin.bias)
            else:
                c.bias = None
        _set_module(model, full, c)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
