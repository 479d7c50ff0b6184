"""Importance of each input channel of a linear layer: the mean of its squared input activations over the
calibration data (llama.cpp's importance matrix).  Optimized RTN weighs its scale search with it and SignRound's
searched start (``init_range``) and GGUF types use it.  One collector, ``ImportanceHooks``, measures it during
any forward a caller runs: the model's (``model_importance``) or one block's (``block_importance``)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm


class ImportanceHooks:
    """While active (``with``), accumulates each named module's per-input-channel sum of squared inputs over the
    forward calls; ``result()`` gives their means, float32 on the CPU.  Lets a forward the caller runs anyway
    (SignRound's float targets) measure importance for free."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}  # the largest |input| each module saw (static activation scales)
        self.counts = dict.fromkeys(self.modules, 0)
        self._hooks: list[Any] = []

    @classmethod
    def of_block(cls, block: nn.Module, names: list[str]) -> "ImportanceHooks":
        return cls({n: block.get_submodule(n) for n in names})

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            total = x.pow(2).sum(0).to("cpu", torch.float64)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            amax = x.abs().amax().to("cpu")
            self.amax[name] = torch.maximum(self.amax[name], amax) if name in self.amax else amax
            self.counts[name] += x.shape[0]

        return hook

    def __enter__(self) -> "ImportanceHooks":
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def reduce(self, group: Any) -> "ImportanceHooks":
        """Sum the squared-input sums and counts and take the amax over the ranks of ``group``
        (``distributed.Group``; each saw its share of the samples): afterwards every rank holds what one process
        that saw every sample would.  A module no rank saw stays unseen."""
        if group is None or not group.active:
            return self
        names = list(self.modules)
        sums = [self.sums.get(n, torch.zeros(self.modules[n].in_features, dtype=torch.float64)) for n in names]
        counts = torch.tensor([self.counts[n] for n in names], dtype=torch.float64)
        amax = [self.amax.get(n, torch.zeros((), dtype=torch.float32)).reshape(1) for n in names]
        group.sum_(sums + [counts])
        if amax:
            stacked = torch.cat(amax)
            group.max_([stacked])
            amax = list(stacked)
        for i, n in enumerate(names):
            self.counts[n] = int(counts[i].item())
            if self.counts[n] > 0:
                self.sums[n], self.amax[n] = sums[i], amax[i].reshape(())
            else:
                self.sums.pop(n, None)
                self.amax.pop(n, None)
        return self

    def result(self, unseen_as_zero: bool = False) -> dict[str, torch.Tensor]:
        """Means of the modules that saw inputs (``unseen_as_zero``: zeros for the others too)."""
        out = {}
        for n, m in self.modules.items():
            if n in self.sums:
                out[n] = (self.sums[n] / max(self.counts[n], 1)).to(torch.float32)
            elif unseen_as_zero:
                out[n] = torch.zeros(m.in_features, dtype=torch.float32)
        return out


@torch.no_grad()
def model_importance(
    model: nn.Module, linears: Mapping[str, nn.Linear], calib: torch.Tensor, batch_size: int,
    amax: dict[str, torch.Tensor] | None = None, group: Any = None,
) -> dict[str, torch.Tensor]:
    """Importance of every layer in ``linears`` over the decoder body's forward of ``calib`` (one entry each);
    ``amax``: filled with each layer's largest |input|.  ``group`` (``distributed.Group``): this rank runs its
    share of ``calib`` and the statistics are reduced over the ranks."""
    from .model_io import decoder_body

    device = next(model.parameters()).device
    body = decoder_body(model)
    if group is not None and group.active:
        from .distributed import Shard

        calib = Shard(group, len(calib)).rows(calib)
    with ImportanceHooks(linears) as hooks:
        for i in tqdm(range(0, len(calib), batch_size), desc="calibration statistics", leave=False):
            body(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
    hooks.reduce(group)
    if amax is not None:
        amax.update(hooks.amax)
    return hooks.result()  # a layer no token reached (an unrouted expert) has no importance: plain RTN ranges


@torch.no_grad()
def block_importance(
    block: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batch_size: int,
    group: Any = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of each named linear layer of ``block`` over all ``inputs``, through ``forward`` (``group``:
    each rank's ``inputs`` are its share, reduced over the ranks; ``device``: where the inputs go, by default
    the block's first parameter's)."""
    device = device or next(block.parameters()).device
    with ImportanceHooks.of_block(block, names) as hooks:
        for i in range(0, len(inputs), batch_size):
            forward(block, inputs[i : i + batch_size].to(device))
    return hooks.reduce(group).result()
