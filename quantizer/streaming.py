"""Streamed tuning (``low_cpu_mem_usage``, on by default): the float model is never whole in memory.

The model folder is opened as the model-free route opens it (``model_free.open_model``: a meta-device skeleton,
the same conditions, ``Declined`` with the reason where it cannot be reproduced exactly), with its buffers
computed on the CPU.  ``StreamedModel`` reads in the weights outside the decoder blocks (embedding, final norm,
lm_head); the block loop (``blockwise``) calls ``BlockStream.open`` before a block, which reads that block's
weights from the source files, and ``BlockStream.close`` after it, which packs the block's quantized layers at
once for every format of the run (``Stager``: the tensors go to a scratch file beside the output folder) and
drops the block's weights back to the meta device.  The export then assembles each checkpoint from the staged
tensors and the source files (float tensors as the model-free route writes them), atomically as always.

So memory holds the weights outside the blocks, one block with its tuning state, and the cached activations,
whatever the model's depth; the checkpoint is the one the in-memory route writes, tensor for tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .formats import ExportJob, QuantizedLayer
from .formats.writer import FileSlice
from .model_free import SourceModel
from ..log import logger
from ..memory import release_host_memory


def _modules_outside(module: nn.Module, skip: set[str], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of ``module`` and its descendants, leaving out the subtrees named in ``skip``."""
    yield prefix, module
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if name not in skip:
            yield from _modules_outside(child, skip, name)


class StreamedModel:
    """An opened model folder whose blocks' weights are read when needed: ``model`` is the skeleton with every
    weight outside ``src.block_names`` read in."""

    def __init__(self, src: SourceModel) -> None:
        self.src = src
        self.model = src.skeleton
        self._materialize(_modules_outside(self.model, set(src.block_names)))

    def read(self, name: str) -> torch.Tensor:
        """The source tensor behind model tensor ``name`` (a tied name reads the one it is stored under), in the
        dtype the in-memory route loads it in."""
        return self.src.tensors[self.src.shared.get(name, name)]

    def _materialize(self, modules: "Iterator[tuple[str, nn.Module]]") -> None:
        made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta parameter) -> (it, its replacement)
        for mod_name, mod in modules:
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                if id(p) not in made:  # tied parameters are one object in several modules: read once
                    made[id(p)] = (p, nn.Parameter(self.read(prefix + pname), requires_grad=p.requires_grad))
                mod._parameters[pname] = made[id(p)][1]
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.is_meta:
                    mod._buffers[bname] = self.read(prefix + bname)

    def open_block(self, name: str, block: nn.Module) -> None:
        """Read ``block``'s weights (it is the module named ``name``) from the source files."""
        self._materialize((f"{name}.{n}" if n else name, m) for n, m in block.named_modules())

    @staticmethod
    def drop_block(block: nn.Module) -> None:
        """Give ``block``'s weights back: each becomes a meta tensor of its shape and dtype."""
        for mod in block.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and not p.is_meta:
                    mod._parameters[pname] = nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                    )
        release_host_memory()

    def close(self) -> None:
        self.src.close()


class Stager:
    """Packs quantized layers for each format as soon as they are tuned and writes the tensors to one scratch
    file per format in ``folder``; ``staged[format name]`` is what ``ExportJob.staged`` takes.  A staged layer's
    ``weight`` is dropped (set to None)."""

    def __init__(self, fmts: list, job: ExportJob, folder: Path) -> None:
        self.folder = folder
        self.writers = {fmt.name: fmt.tensor_writer(job) for fmt in fmts}
        self.paths = {fmt.name: folder / f"staged-{i}.bin" for i, fmt in enumerate(fmts)}
        self.files = {name: open(path, "wb") for name, path in self.paths.items()}
        self.staged: dict[str, dict[str, dict[str, FileSlice]]] = {fmt.name: {} for fmt in fmts}

    def stage(self, layers: Mapping[str, QuantizedLayer]) -> None:
        for fname, write in self.writers.items():
            out, path = self.files[fname], self.paths[fname]
            for name, layer in layers.items():
                entry: dict[str, FileSlice] = {}
                for suffix, t in write(layer).items():
                    t = t.detach().to("cpu").contiguous()
                    offset = out.tell()
                    if t.numel():
                        out.write(t.reshape(-1).view(torch.uint8).numpy().data)
                    entry[suffix] = FileSlice(path, offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
                self.staged[fname][name] = entry
        for layer in layers.values():
            layer.weight = None

    def finish(self) -> None:
        """Flush the scratch files so the writer can copy from them."""
        for f in self.files.values():
            f.close()


class BlockStream:
    """What the block loop calls around each block: read its weights before, pack its layers and drop its
    weights after."""

    def __init__(self, model: StreamedModel, stager: "Stager | None") -> None:
        self.model, self.stager = model, stager

    def open(self, name: str, block: nn.Module) -> None:
        self.model.open_block(name, block)

    def close(self, name: str, block: nn.Module, layers: Mapping[str, QuantizedLayer]) -> None:
        if self.stager is not None:
            self.stager.stage(layers)
        else:  # a rank that writes nothing (torchrun, rank > 0) keeps no packed weights either
            for layer in layers.values():
                layer.weight = None
        self.model.drop_block(block)


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """A scratch folder beside the output folder (same file system, so disk space is checked where it counts),
    named after this process; those a killed run of the same output left behind are removed first."""
    out = Path(output_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging-"
    for old in out.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_staging(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def log_route(src: SourceModel) -> None:
    logger.info(
        "streamed route (low_cpu_mem_usage): %s is never whole in memory: each block's weights are read from %s "
        "when it is tuned and dropped after, its layers packed at once (low_cpu_mem_usage=False loads the model)",
        type(src.skeleton).__name__, src.folder,
    )


def stub_layers(plan_quantize: Mapping[str, Any], linears: Mapping[str, nn.Module]) -> dict[str, QuantizedLayer]:
    """The planned layers as ``QuantizedLayer`` without weights: what a format's ``tensor_writer`` and config
    read (schemes and shapes) before any layer is tuned."""
    return {
        n: QuantizedLayer(n, s, None, None, linears[n].in_features, linears[n].out_features)
        for n, s in plan_quantize.items()
    }
