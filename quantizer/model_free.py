"""Model-free round-to-nearest: quantize a local safetensors folder tensor by tensor, never loading the model.

Plain RTN (``iters=0, disable_opt_rtn=True``) needs no activations, so the model need not run.  This route builds
the model on the meta device only to learn its decoder blocks, linear layers and shapes, and plans the schemes
with ``plan.plan_layers`` (same rules, same errors as the in-memory route).  The format's writer then
reads each tensor from the source files when it reaches it: a planned layer's weight is rounded by the same
``rtn.rtn_quantize`` call as ``quantize.quantize_layers`` and packed by the format; every other tensor
passes through in the dtype the in-memory route loads it in.  So the checkpoint equals the in-memory route's,
tensor for tensor, while memory holds the imports, one output shard and the tensor at hand.

Tensors are read with plain file reads at the offsets of the safetensors header, not through a memory map:
every page of a map that has been read stays resident, and counted in the process's memory, until the map is
closed, which would bring the whole source model back into memory by the end of the run.

A model the route cannot reproduce exactly is declined (``Declined``, with the reason) and the caller loads it
instead: tensors stored under other names or shapes than the model's (transformers would convert them), weights
transformers keeps in float32, an already quantized model, weights that are not safetensors.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelLoadError
from .formats.writer import FileSlice
from .model_io import find_block_names, linear_dims
from .qmath import ROUND_WITH_COMPUTED, QuantizedWeight
from .rtn import rtn_quantize
from .schemes import QuantScheme
from ..log import logger

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# the writer holds one shard's tensors before writing them; this bounds that memory on this route
DEFAULT_MAX_SHARD_BYTES = 1024**3

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Declined(Exception):
    """The model-free route cannot reproduce the in-memory route for this model; the message says why."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from ``folder`` (a single file first, else the index's shards)."""
    single = folder / SAFE_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / f for f in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}); re-download or re-save the model") from None
    raise Declined(f"{folder} has no {SAFE_WEIGHTS} or {SAFE_INDEX} (only safetensors weights are streamed)")


def read_entries(files: list[Path]) -> dict[str, _Entry]:
    """Every tensor's location, from the files' headers (the data is not read)."""
    entries: dict[str, _Entry] = {}
    for path in files:
        corrupt = f"model weights file {path} is corrupt or truncated"
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{corrupt} ({exc}); re-download or re-save the model") from None
        if not isinstance(header, dict):
            raise ModelLoadError(f"{corrupt} (no valid header); re-download or re-save the model")
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise Declined(f"tensor {name} in {path.name} has dtype {info.get('dtype')!r}, which this route does not read")
            try:
                begin, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"{corrupt} (bad header entry for {name}); re-download or re-save the model") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or start + end > size:
                raise ModelLoadError(f"{corrupt} (tensor {name} lies outside the file); re-download or re-save the model")
            if name in entries:
                raise ModelLoadError(f"tensor {name} is stored twice ({entries[name].path.name} and {path.name})")
            entries[name] = _Entry(path, start + begin, end - begin, dtype, shape)
    return entries


class SourceTensors(Mapping[str, torch.Tensor]):
    """The model's tensors (tied duplicates dropped, in state-dict order), each read from the source files when
    it is looked up and cast to the dtype the in-memory route loads it in.  Nothing is cached."""

    def __init__(self, entries: Mapping[str, _Entry], dtypes: Mapping[str, torch.dtype]) -> None:
        self._entries = entries
        self._dtypes = dict(dtypes)  # name -> dtype of the model's tensor; its order is the iteration order
        self._files: dict[Path, Any] = {}
        self.progress: Any = None  # a tqdm bar advanced per tensor read

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)

    def __contains__(self, name: object) -> bool:
        return name in self._dtypes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._dtypes:
            raise KeyError(name)
        e = self._entries[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        f = self._files.get(e.path)
        if f is None:
            f = self._files[e.path] = open(e.path, "rb", buffering=0)
        f.seek(e.offset)
        done = 0
        while done < e.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ModelLoadError(f"model weights file {e.path} is truncated (reading {name}); re-download or re-save the model")
            done += n
        tensor = buf.view(e.dtype).reshape(e.shape)
        if tensor.dtype != self._dtypes[name]:
            tensor = tensor.to(self._dtypes[name])
        if self.progress is not None:
            self.progress.update(1)
        return tensor

    def as_stored(self, name: str, cast_floats_to: torch.dtype | None) -> FileSlice | None:
        """The tensor's bytes in the source file when they are exactly what would be written (same dtype after
        the in-memory route's casts), so the writer copies them without loading the tensor; else None."""
        e = self._entries[name]
        dtype = self._dtypes[name]
        if cast_floats_to is not None and dtype.is_floating_point:
            dtype = cast_floats_to
        if dtype != e.dtype:
            return None
        if self.progress is not None:
            self.progress.update(1)
        return FileSlice(e.path, e.offset, e.nbytes, e.dtype, e.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class FolderTokenizer:
    """The source folder's tokenizer, loaded only when the checkpoint writer saves it (after the tensors)."""

    def __init__(self, folder: "str | Path") -> None:
        self.folder = folder

    def save_pretrained(self, path: str) -> None:
        from .model_io import load_tokenizer

        tokenizer = load_tokenizer(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


class StreamedLayer:
    """A planned layer on the model-free route: the fields of ``formats.QuantizedLayer``, with ``weight`` read
    from the source and rounded to nearest each time it is asked for (never kept: one layer in memory at a time),
    exactly as ``quantize.quantize_layers`` rounds the loaded weight for plain RTN (``rounding``: the format's
    ``rtn_rounding``)."""

    input_amax = None
    rotation = None  # the model-free route runs no transform
    act_ratio = None

    def __init__(self, name: str, scheme: QuantScheme, module: nn.Linear, tensors: SourceTensors, transposed: bool,
                 rounding: str = ROUND_WITH_COMPUTED):
        self.name, self.scheme, self._rounding = name, scheme, rounding
        self.in_features, self.out_features = module.in_features, module.out_features
        self._has_bias = module.bias is not None
        self._tensors, self._transposed = tensors, transposed

    @property
    def weight(self) -> QuantizedWeight:
        w = self._tensors[f"{self.name}.weight"]
        if self._transposed:  # GPT-2 Conv1D stores [in, out]; the in-memory route quantizes its nn.Linear copy
            w = w.t().contiguous()
        s = self.scheme
        return rtn_quantize(w, s.bits, s.group_size, s.sym, self._rounding)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._tensors[f"{self.name}.bias"] if self._has_bias else None


@dataclass
class SourceModel:
    """A model folder opened for the model-free route."""

    folder: Path
    skeleton: nn.Module  # meta device: config, generation config, module names and shapes; no weights
    block_names: list[str]
    linears: dict[str, nn.Linear]  # what the in-memory route quantizes (Conv1D layers as their nn.Linear twin)
    transposed: set[str]  # Conv1D layers (weight stored [in, out])
    tensors: SourceTensors
    shared: dict[str, str] = field(default_factory=dict)  # a tied tensor's name -> the name it is stored under

    def close(self) -> None:
        self.tensors.close()


def _load_dtype(config: Any, folder: Path, entries: Mapping[str, _Entry]) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads the model in: the config's, else the weights' own."""
    dtype = getattr(config, "dtype", None)
    if dtype is None and (folder / SAFE_INDEX).is_file() and not (folder / SAFE_WEIGHTS).is_file():
        dtype = (json.loads((folder / SAFE_INDEX).read_text()).get("metadata") or {}).get("dtype")
    if dtype is None:
        found = {e.dtype for e in entries.values() if e.dtype.is_floating_point}
        if len(found) != 1:
            raise Declined(f"the config names no dtype and the weights mix {sorted(map(str, found))}")
        dtype = found.pop()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise Declined(f"cannot tell the dtype the model loads in (config dtype {getattr(config, 'dtype', None)!r})")
    return dtype


def _skeleton(folder: Path, config: Any, dtype: torch.dtype, real_buffers: bool = False) -> nn.Module:
    """The model on the meta device, with the config and generation config ``from_pretrained`` would give it;
    ``real_buffers``: buffers (rotary frequencies, which no weights file holds) are computed on the CPU."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = copy.deepcopy(config)
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype
    config.name_or_path = str(folder)
    try:
        if real_buffers:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.tie_weights()
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise Declined(f"cannot build the model skeleton ({type(exc).__name__}: {exc})") from None
    model.eval()
    if model.can_generate():  # as from_pretrained: the folder's generation_config.json, else the model config's
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(
                str(folder), config_file_name="config.json", _from_model_config=True
            )
    return model


def _blocks_linears(model: nn.Module, block_names: list[str]) -> tuple[dict[str, nn.Linear], set[str]]:
    """The layers the in-memory route quantizes (``conv1d_to_linear`` then ``quantizable_linears``), in the same
    order; a Conv1D layer is given as a meta ``nn.Linear`` of its shape."""
    from .model_io import _conv1d_type

    conv = _conv1d_type()
    linears: dict[str, nn.Linear] = {}
    transposed: set[str] = set()
    for block in block_names:
        for name, module in model.get_submodule(block).named_modules():
            full = f"{block}.{name}"
            if conv is not None and type(module) is conv:
                in_f, out_f = linear_dims(module)
                linears[full] = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta",
                                          dtype=module.weight.dtype)
                transposed.add(full)
            elif isinstance(module, nn.Linear):
                linears[full] = module
    return linears, transposed


def open_model(
    folder: "str | Path", block_names: list[str] | None = None, real_buffers: bool = False
) -> SourceModel:
    """Open a local model folder for the model-free route; ``Declined`` when it cannot be reproduced exactly.
    ``real_buffers``: the skeleton's buffers are computed on the CPU (streamed tuning runs it)."""
    from transformers import AutoConfig

    folder = Path(folder)
    files = weight_files(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise Declined(f"cannot read its config ({type(exc).__name__}: {exc})") from None
    if getattr(config, "quantization_config", None):
        raise Declined("the folder holds an already quantized model")
    if getattr(config, "transformers_weights", None) or getattr(type(config), "extra_files", None):
        raise Declined("the model's weights are not only in the standard safetensors files")
    entries = read_entries(files)
    dtype = _load_dtype(config, folder, entries)
    model = _skeleton(folder, config, dtype, real_buffers)
    from .moe import fused_experts

    if fused_experts(model):
        raise Declined("its MoE experts are fused 3-D parameters, quantized expert by expert on the loaded model")
    if dtype in (torch.float16, torch.bfloat16) and (
        getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise Declined(f"transformers keeps some of this model's weights in float32 when loading it in {dtype}")
    blocks = block_names or find_block_names(model)
    linears, transposed = _blocks_linears(model, blocks)

    # the tensors the in-memory route writes: the state dict with tied duplicates dropped (first name kept)
    first_name: dict[int, str] = {}
    dtypes: dict[str, torch.dtype] = {}
    shared: dict[str, str] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if t.numel() and id(t) in first_name:
            shared[name] = first_name[id(t)]
            continue
        first_name.setdefault(id(t), name)
        e = entries.get(name)
        if e is None:
            raise Declined(f"tensor {name} of the model is not stored under that name in the weights files")
        if e.shape != tuple(t.shape):
            raise Declined(f"tensor {name} is stored as {list(e.shape)}, the model's is {list(t.shape)}")
        if t.dtype.is_floating_point:
            if t.dtype != dtype:
                raise Declined(f"tensor {name} of the model is {t.dtype}, not the load dtype {dtype}")
            if not e.dtype.is_floating_point:
                raise Declined(f"tensor {name} is stored as {e.dtype}, the model's is {t.dtype}")
        elif e.dtype != t.dtype:
            raise Declined(f"tensor {name} is stored as {e.dtype}, the model's is {t.dtype}")
        dtypes[name] = t.dtype
    extra = sorted(set(entries) - set(state))
    if extra:
        raise Declined(f"the weights files hold tensors the model has no place for (e.g. {extra[0]})")
    if any(name in entries for name in shared):
        twin = next(name for name in shared if name in entries)
        raise Declined(f"the weights files store {twin} and its tied twin {shared[twin]} separately")
    involved = set(shared) | set(shared.values())
    for name in linears:  # the in-memory route rounds such a weight in place, changing its twin too
        if f"{name}.weight" in involved or f"{name}.bias" in involved:
            raise Declined(f"the weight of {name} is shared with another tensor")
    return SourceModel(folder, model, list(blocks), linears, transposed, SourceTensors(entries, dtypes), shared)


def export(
    fmt: Any,
    src: SourceModel,
    plan: Any,
    scheme: QuantScheme,
    output_dir: str,
    tokenizer: Any,
    settings: dict[str, Any],
    max_shard_bytes: int | None = None,
) -> str:
    """Write one format's checkpoint of ``src`` with the layers of ``plan`` rounded to nearest; shards of at most
    ``max_shard_bytes`` (default ``DEFAULT_MAX_SHARD_BYTES``)."""
    from .formats import export as export_job

    layers = {
        name: StreamedLayer(name, s, src.linears[name], src.tensors, name in src.transposed, fmt.rtn_rounding)
        for name, s in plan.quantize.items()
    }
    start = time.time()
    with tqdm(total=len(src.tensors), desc=f"model-free RTN ({fmt.name})", unit="tensor", leave=False) as bar:
        src.tensors.progress = bar
        try:
            path = export_job(
                fmt, src.skeleton, layers, plan, scheme, src.block_names, output_dir, tokenizer, settings,
                float_tensors=src.tensors, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
            )
        finally:
            src.tensors.progress = None
            src.tensors.close()
    logger.info(
        "model-free RTN done in %.1fs: %d layers quantized (%s), %d kept in float",
        time.time() - start, len(layers), scheme.describe(), len(plan.keep_float),
    )
    return path
