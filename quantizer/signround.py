"""SignRound: tune rounding offsets and min/max clipping of a block's linear layers by signed gradient descent.

Pure tuning code: it takes a block (any ``nn.Module``), the names and schemes of its linear layers, the block's
inputs and the float block's outputs (targets), and knows nothing of models or checkpoints.

Per linear layer it learns ``v`` (one rounding offset per weight, init 0, kept in [-0.5, 0.5]) and, with min/max
tuning, ``alpha``/``beta`` (one per group, init 1, kept in [0, 1]).  The loss is the MSE between the block with
fake-quantized weights and the targets; the learning rate decays linearly to 0; the best iteration's parameters
are kept unless ``not_use_best_mse``.

Layers of llama.cpp block types (``GGUF:*`` schemes) are tuned in their block structure instead (``gguf_tune``):
v acts on the block integers, alpha/beta are factors (kept in [0.5, 1.5]) on the (sub-)block scales and offsets
of the iters-0 result the tuning starts from, and the result is the GGUF blocks themselves (``GGUFWeight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import gguf_tune
from .gguf_quant import GGUFWeight, quantize_tensor
from .qmath import QuantizedWeight, fake_quantize, group_layout, group_minmax, quantize_weight, to_groups
from .rtn import searched_range
from .schemes import QuantScheme, gguf_type_of
from ..log import logger


INIT_RANGES = ("minmax", "search", "auto")


def check_init_range(value: Any) -> None:
    if value not in INIT_RANGES:
        raise ValueError(f"init_range must be one of {', '.join(INIT_RANGES)}, got {value!r}")


@dataclass(frozen=True)
class SignRoundOptions:
    iters: int = 200
    lr: float | None = None  # default 1 / iters
    minmax_lr: float | None = None  # default lr
    batch_size: int = 8
    gradient_accumulate_steps: int = 1  # batches whose gradients are summed before one step
    enable_minmax_tuning: bool = True
    not_use_best_mse: bool = False
    dynamic_max_gap: int = -1  # stop a block after this many iterations without a new best loss; <= 0 = never
    enable_adam: bool = False
    seed: int = 42
    # the reference's amp: run the block's forward and backward under bf16 autocast (the tuned parameters, the
    # loss and the updates stay fp32); on CPUs with a bf16 matmul path a step costs ~40% less (SmolLM2 here)
    amp: bool = False
    # where alpha/beta start: "minmax" = each group's own min/max (the reference); "search" = optimized RTN's
    # importance-weighted range (measured on the block's inputs); "auto" = "search" for 2- and 3-bit layers,
    # whose best clipping lies further from min/max than the factors can travel in a short run
    init_range: str = "minmax"

    def __post_init__(self) -> None:
        check_init_range(self.init_range)
        if not isinstance(self.iters, int) or self.iters <= 0:
            raise ValueError(f"iters must be a positive integer for SignRound, got {self.iters!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not isinstance(self.gradient_accumulate_steps, int) or self.gradient_accumulate_steps <= 0:
            raise ValueError(f"gradient_accumulate_steps must be a positive integer, got {self.gradient_accumulate_steps!r}")
        for name in ("lr", "minmax_lr"):
            val = getattr(self, name)
            if val is not None and not val > 0:
                raise ValueError(f"{name} must be positive, got {val!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


class IndexSampler:
    """Cyclic shuffled batches: each pass over the samples is a fresh permutation cut into ``size`` indices
    (an incomplete tail is dropped), so every sample is seen once per pass."""

    def __init__(self, n: int, size: int, generator: torch.Generator) -> None:
        self.n, self.size, self.gen = n, min(size, n), generator
        self._perm: list[int] = []

    def next(self) -> torch.Tensor:
        if len(self._perm) < self.size:
            self._perm = torch.randperm(self.n, generator=self.gen).tolist()
        out, self._perm = self._perm[: self.size], self._perm[self.size :]
        return torch.tensor(out, dtype=torch.long)


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the positions where ``mask`` ([batch, seq] bool) is true (all when None)."""
    if mask is None:
        return torch.nn.functional.mse_loss(out.float(), target.float())
    diff = (out.float() - target.float()).pow(2)
    m = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim())))
    denom = m.sum() * (diff[0, 0].numel() if diff.dim() > 2 else 1)
    return (diff * m).sum() / denom.clamp_min(1)


class _TunedLinear(nn.Module):
    """Wraps a linear layer: its weight is fake-quantized with learnable v / alpha / beta at every call."""

    factor_range = (0.0, 1.0)  # alpha / beta shrink the min / max
    default_factor_lr_scale = 1.0  # without minmax_lr, alpha / beta move at this times the rounding lr

    def __init__(
        self, linear: nn.Linear, scheme: QuantScheme, minmax: bool, search: bool = False,
        importance: torch.Tensor | None = None,
    ) -> None:
        """``search``: alpha/beta start from optimized RTN's range (weighted by ``importance``), not min/max."""
        super().__init__()
        self.linear, self.scheme = linear, scheme
        w = linear.weight
        _, n_groups = group_layout(w.shape[1], scheme.group_size)
        rows = 1 if scheme.group_size == 0 else w.shape[0]
        n_groups = 1 if scheme.group_size == 0 else n_groups
        self.v = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        with torch.no_grad():  # the weight is frozen: group it and take its min/max once, not every step
            wg = to_groups(w.detach().to(torch.float32), scheme.group_size)
            if search:
                start = searched_range(wg, scheme.bits, scheme.sym, importance, tuple(w.shape), scheme.group_size)
            else:
                start = group_minmax(wg)
            self._grouped = (wg, start)
        if minmax:
            self.alpha = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
            self.beta = nn.Parameter(torch.ones(rows, n_groups, 1, device=w.device))
        else:
            self.alpha = self.beta = None

    def factors(self) -> list[nn.Parameter]:
        """The min/max tuning parameters this layer has."""
        return [p for p in (self.alpha, self.beta) if p is not None]

    def _factor(self, p: nn.Parameter | None) -> torch.Tensor | float:
        return p if p is not None else 1.0

    def qdq_weight(self) -> torch.Tensor:
        s = self.scheme
        return fake_quantize(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v,
            alpha=self._factor(self.alpha), beta=self._factor(self.beta), grouped=self._grouped,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qdq_weight().to(x.dtype)
        return nn.functional.linear(x, w, self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        for p in self.factors():
            p.clamp_(*self.factor_range)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v.detach().clone()}
        for name in ("alpha", "beta"):
            p = getattr(self, name)
            if p is not None:
                out[name] = p.detach().clone()
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, val in state.items():
                getattr(self, name).copy_(val)

    def quantized(self) -> QuantizedWeight:
        s = self.scheme
        return quantize_weight(
            self.linear.weight, s.bits, s.group_size, s.sym, v=self.v.detach(),
            alpha=self.alpha.detach() if self.alpha is not None else 1.0,
            beta=self.beta.detach() if self.beta is not None else 1.0, minmax=self._grouped[1],
        )


class _TunedGGUFLinear(_TunedLinear):
    """A linear layer of a llama.cpp block type, tuned in that type's block structure (``gguf_tune``): v acts
    on the weight integers, alpha on the (sub-)block scales, beta on the (sub-)block offsets/mins of the
    asymmetric types; tuning starts from the iters-0 quantizer's result with ``importance``."""

    factor_range = (gguf_tune.FACTOR_MIN, gguf_tune.FACTOR_MAX)  # factors on the iters-0 scales / offsets
    default_factor_lr_scale = gguf_tune.FACTOR_LR_SCALE  # they start at a searched optimum: smaller steps

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, minmax: bool, importance: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.linear, self.scheme = linear, scheme
        qtype = gguf_type_of(scheme)
        w = linear.weight
        self.init = gguf_tune.initial_params(w.detach(), qtype, importance)
        self.v = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        shape = (*self.init.scale.shape, 1)
        self.alpha = nn.Parameter(torch.ones(shape, device=w.device)) if minmax else None
        self.beta = nn.Parameter(torch.ones(shape, device=w.device)) if minmax and gguf_tune.has_offset(qtype) else None

    def qdq_weight(self) -> torch.Tensor:
        return gguf_tune.fake_quantize(
            self.linear.weight, self.init, self.v, self._factor(self.alpha), self._factor(self.beta)
        )

    def quantized(self) -> GGUFWeight:
        return gguf_tune.encode(self.linear.weight, self.init, self.v, self._factor(self.alpha), self._factor(self.beta))


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


@dataclass
class TuneResult:
    weights: dict[str, QuantizedWeight | GGUFWeight]
    loss_before: float  # MSE of plain RTN (v = 0, alpha = beta = 1) on the first batch
    loss_best: float


def tune_block(
    block: nn.Module,
    layers: Mapping[str, QuantScheme],
    inputs: torch.Tensor,
    targets: "torch.Tensor | Callable[[torch.Tensor], torch.Tensor]",
    options: SignRoundOptions,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, float, float], Any] | None = None,
    loss_mask: torch.Tensor | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
) -> TuneResult:
    """Tune ``layers`` (names relative to ``block``) so that ``forward(block, inputs[i])`` matches ``targets[i]``.

    ``inputs``/``targets``: ``[n_samples, ...]``; ``targets`` may instead be a function of a batch's sample
    indices (for layers whose outputs are too large to keep, e.g. an lm_head).  Batches of
    ``options.batch_size`` samples come from a cyclic shuffled sampler; with ``gradient_accumulate_steps`` > 1
    that many batches make one step.  ``loss_mask`` (``[n_samples, seq]`` bool) excludes positions from the loss.
    ``forward`` defaults to ``block(x)``; pass one that adds the block's keyword arguments (masks, positions).
    The block's weights are left unchanged; the result holds the quantized weights.

    Integer layers whose tuning starts from optimized RTN's searched range (``options.init_range``) weight that
    search by ``importance`` too.  Layers with a llama.cpp block type (``GGUF:*`` schemes) are tuned in that type's block structure
    (``gguf_tune``) from the iters-0 quantizer's result, importance-weighted by ``importance`` (layer name ->
    per-input-channel mean squared activation; by default measured on ``inputs``); their results are
    ``GGUFWeight``s.  Block types SignRound cannot tune (iq4_nl) get the iters-0 quantizer, and are named in
    an info log.
    """
    forward = forward or (lambda b, x: b(x))
    gguf_layers = [n for n, s in layers.items() if gguf_type_of(s) is not None]
    searched = {n for n, s in layers.items() if searches_range(s, options)}
    missing = [n for n in gguf_layers + sorted(searched) if importance is None or n not in importance]
    if missing:  # measured on the block's tuning inputs
        importance = {**(importance or {}), **input_importance(block, missing, inputs, forward, options.batch_size)}
    fixed: dict[str, GGUFWeight] = {}
    wrappers: dict[str, _TunedLinear] = {}
    for name, scheme in layers.items():
        linear = block.get_submodule(name)
        qtype = gguf_type_of(scheme)
        if qtype is None:
            imp = importance.get(name) if importance and name in searched else None
            wrappers[name] = _TunedLinear(linear, scheme, options.enable_minmax_tuning, name in searched, imp)
        elif gguf_tune.tunable(qtype):
            imp = importance.get(name) if importance else None
            wrappers[name] = _TunedGGUFLinear(linear, scheme, options.enable_minmax_tuning, imp)
        else:
            imp = importance.get(name) if importance else None
            shape = (linear.out_features, linear.in_features)
            fixed[name] = GGUFWeight(quantize_tensor(linear.weight, qtype, imp), qtype, shape)
    if fixed:
        logger.info(
            "SignRound does not tune %s; quantized with the iters-0 (importance-weighted llama.cpp) quantizer: %s",
            "/".join(sorted({w.qtype for w in fixed.values()})), ", ".join(fixed),
        )
    originals = {n: block.get_submodule(n).weight.detach().clone() for n in fixed}
    with torch.no_grad():  # the other layers are tuned against these layers' quantized weights
        for name, qw in fixed.items():
            weight = block.get_submodule(name).weight
            weight.copy_(qw.dequantize().to(weight.device, weight.dtype))
    for name, wrapper in wrappers.items():
        _swap(block, name, wrapper)
    try:
        if not wrappers:  # nothing to tune: report the loss of the quantized block on one batch
            idx = torch.arange(min(options.batch_size, len(inputs)))
            target = targets(idx) if callable(targets) else targets[idx]
            with torch.no_grad():
                out = forward(block, inputs[idx].to(next(block.parameters()).device))
                loss = masked_mse(out, target.to(out.device), loss_mask[idx].to(out.device) if loss_mask is not None else None).item()
            return TuneResult(dict(fixed), loss, loss)
        result = _tune(block, wrappers, inputs, targets, options, forward, progress, loss_mask)
        result.weights.update(fixed)
        return result
    finally:
        for name, wrapper in wrappers.items():
            _swap(block, name, wrapper.linear)
        with torch.no_grad():
            for name, w in originals.items():
                block.get_submodule(name).weight.copy_(w)


class ImportanceHooks:
    """While active (``with``), accumulates each named linear layer's per-input-channel sum of squared input
    activations over the block's forward calls; ``result()`` gives their means (llama.cpp's importance matrix),
    float32 on the CPU.  Lets a forward the caller runs anyway (the float targets) measure importance for free."""

    def __init__(self, block: nn.Module, names: list[str]) -> None:
        self.block, self.names = block, list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(self.names, 0)
        self._hooks: list[Any] = []

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            total = x.pow(2).sum(0).to("cpu", torch.float64)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] += x.shape[0]

        return hook

    def __enter__(self) -> "ImportanceHooks":
        self._hooks = [self.block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def result(self) -> dict[str, torch.Tensor]:
        return {n: (self.sums[n] / max(self.counts[n], 1)).to(torch.float32) for n in self.names if n in self.sums}


@torch.no_grad()
def input_importance(
    block: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of squared activations entering each named linear layer of ``block`` over all
    ``inputs`` (llama.cpp's importance matrix), in float32 on the CPU."""
    device = next(block.parameters()).device
    with ImportanceHooks(block, names) as hooks:
        for i in range(0, len(inputs), batch_size):
            forward(block, inputs[i : i + batch_size].to(device))
    return hooks.result()


def searches_range(scheme: QuantScheme, options: SignRoundOptions) -> bool:
    """Whether a layer of ``scheme`` starts its min/max tuning from optimized RTN's searched range."""
    if gguf_type_of(scheme) is not None:
        return False
    return options.init_range == "search" or (options.init_range == "auto" and scheme.bits <= 3)


def _tune(block, wrappers, inputs, targets, options, forward, progress, loss_mask) -> TuneResult:
    gen = torch.Generator().manual_seed(options.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rounding = [w.v for w in wrappers.values()]
    minmax = [p for w in wrappers.values() for p in w.factors()]
    lr = options.learning_rate
    # (parameters, base learning rate): the rounding offsets, then the min/max factors of each kind of layer
    groups: list[tuple[list[nn.Parameter], float]] = [(rounding, lr)]
    for scale in sorted({w.default_factor_lr_scale for w in wrappers.values()}):
        params = [p for w in wrappers.values() if w.default_factor_lr_scale == scale for p in w.factors()]
        if params:
            groups.append((params, options.minmax_lr if options.minmax_lr is not None else lr * scale))
    for p in rounding + minmax:
        p.requires_grad_(True)
    adam = None
    if options.enable_adam:
        adam = torch.optim.AdamW([{"params": ps, "lr": base} for ps, base in groups], weight_decay=0)
    n = inputs.shape[0]
    bs = min(options.batch_size, n)
    steps = options.gradient_accumulate_steps
    sampler = IndexSampler(n, bs * steps, gen)
    target_of = targets if callable(targets) else (lambda idx: targets[idx])
    device = next(iter(wrappers.values())).v.device
    best_loss, best_state, first_loss, best_iter = math.inf, None, None, 0
    try:
        for it in range(options.iters):
            indices = sampler.next()
            value = 0.0
            parts = [indices[i : i + bs] for i in range(0, len(indices), bs)]
            for idx in parts:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.amp):
                    out = forward(block, inputs[idx].to(device))
                mask = loss_mask[idx].to(device) if loss_mask is not None else None
                loss = masked_mse(out, target_of(idx).to(device), mask) / len(parts)  # in fp32
                loss.backward()
                value += loss.item()
            if first_loss is None:
                first_loss = value
            if value < best_loss:
                best_loss, best_iter = value, it
                if not options.not_use_best_mse:
                    best_state = {k: w.state() for k, w in wrappers.items()}
            elif 0 < options.dynamic_max_gap <= it - best_iter and not options.not_use_best_mse:
                break
            decay = 1.0 - it / options.iters  # linear decay to 0
            with torch.no_grad():
                if adam is not None:
                    for g, (_, base) in zip(adam.param_groups, groups):
                        g["lr"] = base * decay
                    adam.step()
                    adam.zero_grad(set_to_none=True)
                else:
                    for params, step in groups:
                        for p in params:
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
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
