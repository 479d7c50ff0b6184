"""The activations the block-by-block loop carries: what enters the current block on the float path and on the
quantized path, for every calibration sample, and the keyword arguments (masks, position embeddings) the model
passes its blocks."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .model_io import decoder_body
from ..log import logger


# the cached activations go to disk when their copies (the float and quantized paths' inputs and a block's two
# outputs) would take more than this share of the memory available when the first block's inputs are captured
OFFLOAD_SHARE = 0.5
CACHED_COPIES = 4


class ActivationStore:
    """Where the block loop's cached activations live: in memory, or (offload) in file-backed tensors in a scratch
    folder under ``AR_WORK_SPACE``, whose pages the kernel writes out and drops under memory pressure instead of
    running out of memory.  ``offload``: True / False, or None to decide at the first allocation (the block
    inputs of every sample): offload when ``CACHED_COPIES`` of it would take more than ``OFFLOAD_SHARE`` of the
    available memory, unless ``AR_DISABLE_OFFLOAD``.  Each file is unlinked as soon as it is mapped, so the disk
    space comes back with the tensor, also when the process is killed; ``close`` removes the folder."""

    def __init__(self, offload: bool | None = None) -> None:
        self.offload = offload
        self.folder: Path | None = None

    def _decide(self, nbytes: int) -> bool:
        from .. import envs
        from ..memory import available_bytes

        need = CACHED_COPIES * nbytes
        avail = available_bytes()
        if envs.AR_DISABLE_OFFLOAD:
            if avail is not None and need > OFFLOAD_SHARE * avail:
                logger.warning("the cached activations (%.2f GiB) may not fit in the %.2f GiB available; "
                               "AR_DISABLE_OFFLOAD keeps them in memory", need / 2**30, avail / 2**30)
            return False
        if avail is None or need <= OFFLOAD_SHARE * avail:
            return False
        logger.info("the cached activations (%.2f GiB) would take more than half of the %.2f GiB available: they are "
                    "kept in files under %s (AR_WORK_SPACE; AR_DISABLE_OFFLOAD=1 keeps them in memory)",
                    need / 2**30, avail / 2**30, envs.AR_WORK_SPACE)
        return True

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor for cached activations."""
        numel = math.prod(shape)
        if self.offload is None:
            self.offload = device.type == "cpu" and self._decide(numel * dtype.itemsize)
        if not self.offload or device.type != "cpu" or numel == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        if self.folder is None:
            from .. import envs

            root = Path(envs.AR_WORK_SPACE)
            root.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"activations-{os.getpid()}-", dir=root))
        fd, path = tempfile.mkstemp(dir=self.folder, suffix=".bin")
        try:
            os.ftruncate(fd, numel * dtype.itemsize)
        finally:
            os.close(fd)
        try:
            t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.unlink(path)  # the mapping keeps the data; the space is freed with the tensor
        return t.view(shape)

    def filled(self, parts: "Iterator[torch.Tensor]", n: int) -> torch.Tensor:
        """The concatenation of ``parts`` (batches along dimension 0, ``n`` rows in all) in a tensor of this store."""
        out, i = None, 0
        for part in parts:
            if out is None:
                out = self.empty((n, *part.shape[1:]), part.dtype, part.device)
            out[i : i + len(part)] = part
            i += len(part)
        if out is None:
            raise ValueError("no activations to store")
        return out

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


MEMORY = ActivationStore(offload=False)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after block 0's inputs are seen."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int,
    store: ActivationStore = MEMORY,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering ``first_block`` for every calibration sample, and the keyword arguments (masks,
    position embeddings) the model passes it for one batch of ``batch_size`` samples."""
    hidden: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        if not hidden:
            hidden.append(store.empty((len(calib), *x.shape[1:]), x.dtype, x.device))
            hidden.append(0)
        out, i = hidden
        out[i : i + len(x)] = x.detach()
        hidden[1] = i + len(x)
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    body = decoder_body(model)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(calib), batch_size):
            try:
                body(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen["use_cache"] = False
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return hidden[0], kwargs_seen


class ActivationCache:
    """Inputs of the current block: ``fp`` (the float model's) and ``q`` (the model's with the blocks before it
    quantized), ``[n_samples, seq, hidden]`` each, kept on ``cache_device`` (default: where the model runs);
    with a ``shard`` only this rank's rows.

    Built by running the model up to its first block; ``advance`` moves both past a block."""

    def __init__(
        self,
        model: nn.Module,
        first_block: nn.Module,
        calib: torch.Tensor,
        batch_size: int,
        cache_device: torch.device | str | None = None,
        shard: Any = None,
        store: ActivationStore = MEMORY,
    ) -> None:
        if shard is not None and shard.group.active:  # this rank's share of the samples (``distributed.Shard``)
            calib = shard.rows(calib)
        fp, self.kwargs = capture_block_inputs(model, first_block, calib, batch_size, store)
        self.kwargs_batch = min(batch_size, len(calib))  # the batch the keyword arguments were captured for
        self.device = fp.device  # where the model (and so every block) runs
        if cache_device is not None:
            fp = fp.to(cache_device)
        self.fp: torch.Tensor | None = fp
        self.q: torch.Tensor | None = fp
        self.batch_size = batch_size

    def advance(self, fp_out: torch.Tensor, q_out: torch.Tensor) -> None:
        """The current block's outputs become the next block's inputs."""
        self.fp, self.q = fp_out, q_out

    def clear(self) -> None:
        """Drop the cached activations (the caller then releases the memory)."""
        self.fp = self.q = None
