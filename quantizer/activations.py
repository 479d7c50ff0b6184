"""The activations the block-by-block loop carries: what enters the current block on the float path and on the
quantized path, for every calibration sample, and the keyword arguments (masks, position embeddings) the model
passes its blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model_io import decoder_body


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after block 0's inputs are seen."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering ``first_block`` for every calibration sample, and the keyword arguments (masks,
    position embeddings) the model passes it for one batch of ``batch_size`` samples."""
    hidden: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.detach())
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
    return torch.cat(hidden), kwargs_seen


class ActivationCache:
    """Inputs of the current block: ``fp`` (the float model's) and ``q`` (the model's with the blocks before it
    quantized), ``[n_samples, seq, hidden]`` each, kept on ``cache_device`` (default: where the model runs).

    Built by running the model up to its first block; ``advance`` moves both past a block."""

    def __init__(
        self,
        model: nn.Module,
        first_block: nn.Module,
        calib: torch.Tensor,
        batch_size: int,
        cache_device: torch.device | str | None = None,
    ) -> None:
        fp, self.kwargs = capture_block_inputs(model, first_block, calib, batch_size)
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
