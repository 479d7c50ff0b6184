"""Writing a checkpoint folder: safetensors shards, config, tokenizer, all-or-nothing.

The folder is written to a hidden temporary sibling and renamed into place only when complete, so a
crash or an error never leaves a half-written checkpoint where a good one is expected.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..errors import OutputError
from ...log import logger

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Fail early, with a clear message, when ``output_dir`` cannot be written."""
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder; choose another --output_dir")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write the output folder {out}: {parent} is not a folder; choose another --output_dir")
    try:  # permissions alone do not tell (root, read-only mounts): try it
        os.rmdir(tempfile.mkdtemp(prefix=".autoround-probe-", dir=parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write the output folder {out}: {parent} is not writable ({exc.strerror or exc}); "
            "choose another --output_dir"
        ) from None
    return out


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``output_dir``, on error it is removed."""
    out = check_output_dir(output_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the output folder {out}: {exc.strerror or exc}; choose another --output_dir") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint folder is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def float_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped (the first name of a shared tensor is kept)."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return out


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes inside a file, written to a checkpoint as they are, in chunks, without being loaded
    (the model-free route passes float tensors through this way)."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        """The tensor itself, read from the file (for a small tensor a format inspects, such as packed zeros)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = bytearray(f.read(self.nbytes))
        if not raw:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).reshape(self.shape)


def _nbytes(t: "torch.Tensor | FileSlice") -> int:
    return t.nbytes if isinstance(t, FileSlice) else t.numel() * t.element_size()


class _ShardWriter:
    """One safetensors file written tensor by tensor: the bytes go to a scratch file as they come, and the
    header (which must come first and holds every offset) is written in front of them at the end, so no more
    than one tensor is ever held in memory (``safetensors.torch.save_file`` needs the whole shard)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scratch = path.with_name(path.name + ".data")
        self.file = open(self.scratch, "wb")
        self.header: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.size = 0

    def add(self, name: str, tensor: "torch.Tensor | FileSlice") -> None:
        t = tensor if isinstance(tensor, FileSlice) else tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise OutputError(f"cannot write tensor {name}: dtype {t.dtype} has no safetensors name")
        nbytes = _nbytes(t)
        if isinstance(t, FileSlice):
            with open(t.path, "rb") as src:
                src.seek(t.offset)
                left = nbytes
                while left:
                    chunk = src.read(min(left, 16 * 2**20))
                    if not chunk:
                        raise OutputError(f"cannot copy tensor {name}: {t.path} ends early")
                    self.file.write(chunk)
                    left -= len(chunk)
        elif nbytes:
            self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size, self.size + nbytes]}
        self.sizes[name] = nbytes
        self.size += nbytes

    def finish(self) -> tuple[Path, dict[str, int]]:
        self.file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self.scratch, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        os.remove(self.scratch)
        return self.path, self.sizes


def write_safetensors(
    folder: Path,
    tensors: "Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]",
    max_shard_bytes: int,
) -> None:
    """Write ``model.safetensors``, or numbered shards and their index when the tensors exceed
    ``max_shard_bytes``.  Tensors are written as they come, so a lazy iterable of (name, tensor) pairs (the
    model-free route) never has more than one tensor in memory."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    written: list[tuple[Path, dict[str, int]]] = []  # (file, name -> bytes) per shard
    shard: _ShardWriter | None = None
    seen: set[str] = set()
    for name, t in items:
        if name in seen:
            raise RuntimeError(f"internal error: tensor {name} written twice")
        seen.add(name)
        nbytes = _nbytes(t)
        if shard is not None and shard.sizes and shard.size + nbytes > max_shard_bytes:
            written.append(shard.finish())
            shard = None
        if shard is None:
            shard = _ShardWriter(folder / f".shard-{len(written) + 1:05d}.safetensors")
        shard.add(name, t)
        del t
    if shard is not None or not written:
        written.append((shard or _ShardWriter(folder / ".shard-00001.safetensors")).finish())
    if len(written) == 1:
        os.rename(written[0][0], folder / "model.safetensors")
        return
    weight_map = {}
    total = 0
    for i, (path, sizes) in enumerate(written, 1):
        fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.rename(path, folder / fname)
        for name, nbytes in sizes.items():
            weight_map[name] = fname
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def write_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: Any,
    tensors: "Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]",
    quantization_config: dict[str, Any] | None,
    tokenizer: Any = None,
    extra_json: Mapping[str, dict[str, Any]] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_updates: Mapping[str, Any] | None = None,
) -> Path:
    """Write tensors + config (with ``quantization_config``, none for a float checkpoint) + generation config
    + tokenizer atomically."""
    with atomic_output_dir(output_dir) as tmp:
        write_safetensors(tmp, tensors, max_shard_bytes)
        config = copy.deepcopy(model.config)
        if quantization_config is not None:
            config.quantization_config = quantization_config
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
        for key, value in (config_updates or {}).items():
            setattr(config, key, value)
        if not getattr(config, "architectures", None) and isinstance(model, torch.nn.Module):
            # as transformers' save_pretrained does: engines (vLLM, SGLang) pick the model class from this list,
            # and a model built from a config has none
            config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception as exc:  # an invalid generation config must not lose the checkpoint
                logger.warning("generation config not saved: %s", exc)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for fname, payload in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("checkpoint written to %s", Path(output_dir).absolute())
    return Path(output_dir).absolute()


def checkpoint_tensors(job: Any, layer_tensors: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint, as (name, tensor) pairs: the model's float tensors (cast to ``job.dtype``)
    with each quantized layer's ``weight`` replaced by what ``layer_tensors(layer)`` returns (suffix -> tensor),
    plus its bias.

    One function for every format, so the formats differ only in how one layer is packed.  The float tensors
    are ``job.model``'s, or ``job.float_tensors`` when the model-free route reads them from the source files
    (then each one is read only when it is reached, and so is each quantized layer's weight).  A layer that
    streamed tuning packed already (``job.staged``) is copied from where it was staged."""
    floats = job.float_tensors if job.float_tensors is not None else float_state_dict(job.model)
    as_stored = getattr(floats, "as_stored", None)  # the model-free route: bytes copied as they are when possible
    for name in floats:
        layer_name, _, suffix = name.rpartition(".")
        if layer_name in job.layers and suffix in ("weight", "bias"):
            continue
        raw = as_stored(name, job.dtype) if as_stored is not None else None
        if raw is not None:
            yield name, raw
            continue
        tensor = floats[name]
        if job.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(job.dtype)
        yield name, tensor
    staged = job.staged or {}
    for name, layer in job.layers.items():
        packed = staged.get(name)
        for suffix, t in (packed if packed is not None else layer_tensors(layer)).items():
            yield f"{name}.{suffix}", t
        bias = layer.bias
        if bias is not None:
            yield f"{name}.bias", bias.to(job.dtype or bias.dtype)
    for name, file in sorted(job.source_tensors.items()):  # never instantiated by the model class: as stored
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            yield name, f.get_tensor(name)


def save_format(
    fmt: Any,
    job: Any,
    output_dir: str | os.PathLike,
    layer_tensors: Any,
    quantization_config: dict[str, Any] | None,
    extra_json: Mapping[str, dict[str, Any]] | None = None,
    config_updates: Mapping[str, Any] | None = None,
) -> str:
    """The one writer behind every format's ``save``; ``config_updates``: attributes set on the written config."""
    updates: dict[str, Any] = dict(config_updates or {})
    if any(_is_output_layer(job.model, n) for n in job.layers):
        # a quantized lm_head is stored apart from the (float) input embedding: the written model is untied
        updates["tie_word_embeddings"] = False
    logger.info("writing %s checkpoint (%d quantized layers)", fmt.name, len(job.layers))
    tensors = checkpoint_tensors(job, layer_tensors)
    if getattr(fmt, "moe_experts", None) == "fused":
        from ..moe import fuse_back_tensors

        tensors = fuse_back_tensors(job.model, tensors)
    if getattr(fmt, "original_names", False):
        tensors = original_names(job.model, tensors)
    return str(
        write_checkpoint(
            output_dir,
            model=job.model,
            tensors=tensors,
            quantization_config=quantization_config,
            tokenizer=job.tokenizer,
            extra_json=extra_json,
            config_updates=updates,
            max_shard_bytes=job.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        )
    )


def original_names(model: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` under the names ``save_pretrained`` writes: transformers 5 renames or fuses some checkpoints'
    tensors when it loads them (Mixtral's ``block_sparse_moe.experts.N.w1`` into ``mlp.experts.gate_up_proj``, ...)
    and reverts that when it saves; done here tensor by tensor (those conversions split one tensor into several on
    the way back), so the stream never holds more than one layer's tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    for name, tensor in tensors:
        yield from revert_weight_conversion(model, {name: tensor}).items()


def _is_output_layer(model: Any, name: str) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    return out is not None and out is _submodule(model, name)


def _submodule(model: Any, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
