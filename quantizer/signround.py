"""SignRound: tune rounding offsets and min/max clipping of a block's linear layers by signed gradient descent.

Pure tuning code: it takes a block (any ``nn.Module``), the names and schemes of its linear layers, the block's
inputs and the float block's outputs (targets), and knows nothing of models or checkpoints.

Per linear layer it learns ``v`` (one rounding offset per weight, init 0, kept in [-0.5, 0.5]) and, with min/max
tuning, ``alpha``/``beta`` (one per group, init 1, kept in [0, 1]).  The loss is the MSE between the block with
fake-quantized weights and the targets; the learning rate decays linearly to 0; the best iteration's parameters
are kept unless ``not_use_best_mse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .qmath import QuantizedWeight, fake_quantize, group_layout, quantize_weight
from .schemes import QuantScheme


@dataclass(frozen=True)
class SignRoundOptions:
    iters: int = 200
    lr: float | None = None  # default 1 / iters
    minmax_lr: float | None = None  # default lr
    batch_size: int = 8
    enable_minmax_tuning: bool = True
    not_use_best_mse: bool = False
    enable_adam: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.iters <= 0:
            raise ValueError(f"iters must be positive for SignRound, got {self.iters}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


class _TunedLinear(nn.Module):
    """Wraps a linear layer: its weight is fake-quantized with learnable v / alpha / beta at every call."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, minmax: bool) -> None:
        super().__init__()
        self.linear, self.scheme = linear, scheme
        w = linear.weight
        _, n_groups = group_layout(w.shape[1], scheme.group_size)
        rows = 1 if scheme.group_size == 0 else w.shape[0]
        n_groups = 1 if scheme.group_size == 0 else n_groups
        self.v = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        if minmax:
            self.alpha = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
            self.beta = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
        else:
            self.alpha = self.beta = None

    def qdq_weight(self) -> torch.Tensor:
        s = self.scheme
        return fake_quantize(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v,
            alpha=self.alpha if self.alpha is not None else 1.0,
            beta=self.beta if self.beta is not None else 1.0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qdq_weight().to(x.dtype)
        return nn.functional.linear(x, w, self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        if self.alpha is not None:
            self.alpha.clamp_(0.0, 1.0)
            self.beta.clamp_(0.0, 1.0)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v.detach().clone()}
        if self.alpha is not None:
            out.update(alpha=self.alpha.detach().clone(), beta=self.beta.detach().clone())
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.v.copy_(state["v"])
            if self.alpha is not None:
                self.alpha.copy_(state["alpha"])
                self.beta.copy_(state["beta"])

    def quantized(self) -> QuantizedWeight:
        s = self.scheme
        return quantize_weight(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v.detach(),
            alpha=self.alpha.detach() if self.alpha is not None else 1.0,
            beta=self.beta.detach() if self.beta is not None else 1.0,
        )


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


@dataclass
class TuneResult:
    weights: dict[str, QuantizedWeight]
    loss_before: float  # MSE of plain RTN (v = 0, alpha = beta = 1) on the first batch
    loss_best: float


def tune_block(
    block: nn.Module,
    layers: Mapping[str, QuantScheme],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    options: SignRoundOptions,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, float, float], Any] | None = None,
) -> TuneResult:
    """Tune ``layers`` (names relative to ``block``) so that ``forward(block, inputs[i])`` matches ``targets[i]``.

    ``inputs``/``targets``: ``[n_samples, ...]``; batches of ``options.batch_size`` samples are drawn at random.
    ``forward`` defaults to ``block(x)``; pass one that adds the block's keyword arguments (masks, positions).
    The block's weights are left unchanged; the result holds the quantized weights.
    """
    forward = forward or (lambda b, x: b(x))
    wrappers = {n: _TunedLinear(block.get_submodule(n), s, options.enable_minmax_tuning) for n, s in layers.items()}
    for name, wrapper in wrappers.items():
        _swap(block, name, wrapper)
    try:
        return _tune(block, wrappers, inputs, targets, options, forward, progress)
    finally:
        for name, wrapper in wrappers.items():
            _swap(block, name, wrapper.linear)


def _tune(block, wrappers, inputs, targets, options, forward, progress) -> TuneResult:
    gen = torch.Generator().manual_seed(options.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rounding = [w.v for w in wrappers.values()]
    minmax = [p for w in wrappers.values() if w.alpha is not None for p in (w.alpha, w.beta)]
    lr = options.learning_rate
    mm_lr = options.minmax_lr if options.minmax_lr is not None else lr
    for p in rounding + minmax:
        p.requires_grad_(True)
    adam = None
    if options.enable_adam:
        adam = torch.optim.AdamW([{"params": rounding, "lr": lr}, {"params": minmax, "lr": mm_lr}], weight_decay=0)
    n = inputs.shape[0]
    bs = min(options.batch_size, n)
    best_loss, best_state, first_loss = math.inf, None, None
    try:
        for it in range(options.iters):
            idx = torch.randperm(n, generator=gen)[:bs]
            out = forward(block, inputs[idx])
            loss = torch.nn.functional.mse_loss(out.float(), targets[idx].float())
            value = loss.item()
            if first_loss is None:
                first_loss = value
            if value < best_loss or options.not_use_best_mse:
                best_loss = value
                best_state = {k: w.state() for k, w in wrappers.items()}
            loss.backward()
            decay = 1.0 - it / options.iters  # linear decay to 0
            with torch.no_grad():
                if adam is not None:
                    for g, base in zip(adam.param_groups, (lr, mm_lr)):
                        g["lr"] = base * decay
                    adam.step()
                    adam.zero_grad(set_to_none=True)
                else:
                    for p, step in [(p, lr) for p in rounding] + [(p, mm_lr) for p in minmax]:
                        if p.grad is not None:
                            p.add_(p.grad.sign(), alpha=-step * decay)
                            p.grad = None
                for w in wrappers.values():
                    w.clamp_()
            if progress is not None:
                progress(it, value, best_loss)
        if best_state is not None:
            for k, w in wrappers.items():
                w.load(best_state[k])
        return TuneResult({k: w.quantized() for k, w in wrappers.items()}, first_loss or 0.0, best_loss)
    finally:
        for p in rounding + minmax:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
