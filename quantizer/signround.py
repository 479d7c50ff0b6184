"""SignRound: tune rounding offsets and min/max clipping of a block's linear layers by signed gradient descent.

Pure tuning code: it takes a block (any ``nn.Module``), the names and schemes of its linear layers, the block's
inputs and the float block's outputs (targets), and knows nothing of models or checkpoints, nor of data types:
each layer's weight family (``dtypes``) supplies the tunable fake-quantizer that replaces the layer while the
block is tuned (``WeightFamily.tuner``: integers learn ``v``, one rounding offset per weight kept in
[-0.5, 0.5], and with min/max tuning ``alpha``/``beta``, per-group factors on the min and max; GGUF block types
learn the same in their block structure).  The loss is the MSE between the block with fake-quantized weights and
the targets; the learning rate decays linearly to 0; the best iteration's parameters are kept unless
``not_use_best_mse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .act_quant import ActQuantizer, quantizes_acts, tunes_max, tunes_min
from .transforms.rotation import RotatedInput, rotation_of
from .devices import carry_placement
from .dtypes import family_of
from .importance import block_importance
from .quantize import shared_global_amax
# SignRoundOptions lives in options; imported here too, where the tuner's callers look for it
from .options import SignRoundOptions, TuningOptions  # noqa: F401
from .schemes import QuantScheme
from ..log import logger


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


# SignRoundV2's outlier-filtered loss leaves out this share of the largest elementwise errors of a batch
OUTLIER_SHARE = 0.001


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               drop_outliers: bool = False) -> torch.Tensor:
    """Mean squared error over the positions where ``mask`` ([batch, seq] bool) is true (all when None).

    ``drop_outliers``: the ``OUTLIER_SHARE`` largest |out - target| elements of those positions (at least one)
    count for nothing, so that a few outlier activations do not steer a low-bit block's tuning."""
    if mask is None and not drop_outliers:
        return torch.nn.functional.mse_loss(out.float(), target.float())
    diff = (out.float() - target.float()).pow(2)
    m = _element_mask(mask, diff)
    if drop_outliers:
        counted = int(m.sum().item())
        k = max(1, int(counted * OUTLIER_SHARE))
        if counted > k:
            scored = torch.where(m > 0, diff.detach(), torch.full_like(diff, -1.0)).reshape(-1)
            top = torch.topk(scored, k).indices
            m = m.reshape(-1).clone()
            m[top] = 0
            m = m.reshape(diff.shape)
    return (diff * m).sum() / m.sum().clamp_min(1)


def _element_mask(mask: torch.Tensor | None, diff: torch.Tensor) -> torch.Tensor:
    """``mask`` ([batch, seq] bool, None: all) as a weight of 1 or 0 per element of ``diff``."""
    if mask is None:
        return torch.ones_like(diff)
    return mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim()))).expand_as(diff)


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    carry_placement(block.get_submodule(name), new)  # a layer placed on another device: its wrapper runs there
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


@dataclass
class TuneResult:
    weights: dict[str, Any]  # layer name -> the family's packed weight (QuantizedWeight, GGUFWeight, ...)
    loss_before: float  # MSE of plain RTN (v = 0, alpha = beta = 1) on the first batch
    loss_best: float
    # layer name -> its tuned activation clip ratios (max, min) (``act_quant.ActQuantizer``), for the layers that
    # tune them
    act_ratios: dict[str, tuple[float, float]] = field(default_factory=dict)


def tune_block(
    block: nn.Module,
    layers: Mapping[str, QuantScheme],
    inputs: torch.Tensor,
    targets: "torch.Tensor | Callable[[torch.Tensor], torch.Tensor]",
    options: TuningOptions,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, float, float], Any] | None = None,
    loss_mask: torch.Tensor | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    input_amax: Mapping[str, torch.Tensor] | None = None,
    shard: Any = None,
    device: torch.device | None = None,
) -> TuneResult:
    """Tune ``layers`` (names relative to ``block``) so that ``forward(block, inputs[i])`` matches ``targets[i]``.

    ``inputs``/``targets``: ``[n_samples, ...]``; ``targets`` may instead be a function of a batch's sample
    indices (for layers whose outputs are too large to keep, e.g. an lm_head).  Batches of
    ``options.batch_size`` samples come from a cyclic shuffled sampler; with ``gradient_accumulate_steps`` > 1
    that many batches make one step.  ``loss_mask`` (``[n_samples, seq]`` bool) excludes positions from the loss.
    ``forward`` defaults to ``block(x)``; pass one that adds the block's keyword arguments (masks, positions).
    The block's weights are left unchanged; the result holds the quantized weights.

    Layers whose scheme quantizes activations (act_bits < 16) quantize their inputs in the tuned forward too
    (``act_quant``; ``input_amax``: layer name -> calibrated input amax, for static activation scales), and
    tune their activation clip ratios with the min/max factors where ``act_quant.tunes_max`` says so
    (``TuneResult.act_ratios``).

    ``shard`` (``distributed.Shard``, torchrun): ``inputs`` and ``targets`` hold this rank's rows of
    ``shard.n`` samples and ``loss_mask`` all of them; the batches are drawn from the global indices, each rank
    computes its rows' part of the batch loss, and the gradients and losses are summed over the ranks before
    every step, so every rank takes the step one process holding every sample would.

    ``device``: where the block's inputs go and the loss is computed (default: the first tuned layer's device);
    layers placed on other devices (``devices.placed``) keep their wrappers there.

    Each layer's weight family makes its tunable fake-quantizer (``WeightFamily.tuner``).  A family that asks for
    an importance (``tuning_importance``: integer layers starting from optimized RTN's searched range, GGUF block
    types starting from the importance-weighted iters-0 blocks) gets ``importance[name]`` (layer name ->
    per-input-channel mean squared activation; by default measured on ``inputs``).  Types a family does not tune
    (iq4_nl) get the family's iters-0 quantizer, and are named in an info log.
    """
    forward = forward or (lambda b, x: b(x))
    if options.iters <= 0:
        raise ValueError(f"iters must be a positive integer for SignRound, got {options.iters!r}")
    need = {n for n, s in layers.items() if family_of(s).tuning_importance(s, options)}
    missing = [n for n in sorted(need) if importance is None or n not in importance]
    if missing:  # measured on the block's tuning inputs
        importance = {**(importance or {}), **block_importance(block, missing, inputs, forward, options.batch_size,
                                                               shard.group if shard is not None else None, device)}
    fixed: dict[str, Any] = {}
    wrappers: dict[str, nn.Module] = {}
    shared = shared_global_amax({n: block.get_submodule(n) for n in layers}, layers)
    for name, scheme in layers.items():
        linear = block.get_submodule(name)
        family = family_of(scheme)
        # statistics measured on the block's device go where the layer is (``devices.placed``)
        imp = importance.get(name) if importance and name in need else None
        imp = imp.to(linear.weight.device) if imp is not None else None
        wrapper = family.tuner(linear, scheme, options, imp, **shared.get(name, {}))
        if wrapper is not None:
            if quantizes_acts(scheme):
                amax = (input_amax or {}).get(name)
                minmax = options.enable_minmax_tuning
                wrapper.act = ActQuantizer(scheme, amax.to(linear.weight.device) if amax is not None else None,
                                           tune_max=tunes_max(scheme, minmax), tune_min=tunes_min(scheme, minmax),
                                           device=linear.weight.device)
            wrappers[name] = wrapper
        else:  # a type SignRound does not tune: its family's importance-weighted iters-0 quantizer
            fixed[name] = family.quantize(linear.weight, scheme, imp, **shared.get(name, {}))
    if fixed:
        logger.info(
            "SignRound does not tune %s; quantized with the iters-0 (importance-weighted) quantizer: %s",
            "/".join(sorted({family_of(layers[n]).type_name(layers[n]) for n in fixed})), ", ".join(fixed),
        )
    originals = {n: block.get_submodule(n).weight.detach().clone() for n in fixed}
    with torch.no_grad():  # the other layers are tuned against these layers' quantized weights
        for name, qw in fixed.items():
            weight = block.get_submodule(name).weight
            weight.copy_(qw.dequantize().to(weight.device, weight.dtype))
    for name, wrapper in wrappers.items():  # a rotated layer's wrapper sees the rotated input (its hook is bypassed)
        rot = rotation_of(block.get_submodule(name))
        _swap(block, name, RotatedInput(wrapper, rot) if rot is not None else wrapper)
    try:
        if not wrappers:  # nothing to tune: report the loss of the quantized block on one batch
            idx = torch.arange(min(options.batch_size, len(inputs)))
            target = targets(idx) if callable(targets) else targets[idx]
            mask = None
            if loss_mask is not None:  # a shard's local rows 0.. are its first global samples
                mask = loss_mask[idx if shard is None else shard.owned(torch.arange(shard.n))[: len(idx)]]
            with torch.no_grad():
                out = forward(block, inputs[idx].to(device or next(block.parameters()).device))
                loss = masked_mse(out, target.to(out.device), mask.to(out.device) if mask is not None else None).item()
            return TuneResult(dict(fixed), loss, loss)
        result = _tune(block, wrappers, inputs, targets, options, forward, progress, loss_mask, shard, device)
        result.weights.update(fixed)
        return result
    finally:
        for name, wrapper in wrappers.items():
            _swap(block, name, wrapper.linear)
        with torch.no_grad():
            for name, w in originals.items():
                block.get_submodule(name).weight.copy_(w)


def searches_range(scheme: QuantScheme, options: TuningOptions) -> bool:
    """Whether the importance a layer of ``scheme`` is tuned with is measured in the block's float forward."""
    return family_of(scheme).float_forward_importance(scheme, options)


def _sharded_loss(block, forward, inputs, target_of, loss_mask, idx, shard, drop_outliers, device, amp,
                  per_position: int, positions: int, parts: int) -> float:
    """A rank's part of one batch's loss (``idx``: global indices), normalized by the whole batch's element
    count, back-propagated; returns its value.  Every rank calls it for every batch (the outlier filter gathers
    each rank's largest errors), also one that holds none of the batch's samples."""
    owned = shard.owned(idx)
    rows = shard.local(owned)
    positions_in_batch = int(loss_mask[idx].sum().item()) if loss_mask is not None else len(idx) * positions
    counted = positions_in_batch * per_position
    k = max(1, int(counted * OUTLIER_SHARE)) if drop_outliers else 0
    filtered = drop_outliers and counted > k
    diff = m = None
    if len(rows):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(block, inputs[rows].to(device))
        diff = (out.float() - target_of(rows).to(device).float()).pow(2)
        m = _element_mask(loss_mask[owned].to(device) if loss_mask is not None else None, diff)
    if filtered:  # the k largest errors of the whole batch count for nothing
        top = torch.full((k,), -1.0, device=device)
        if diff is not None:
            scored = torch.where(m > 0, diff.detach(), torch.full_like(diff, -1.0)).reshape(-1)
            mine = torch.topk(scored, min(k, scored.numel())).values
            top[: len(mine)] = mine
        threshold = torch.topk(torch.cat(shard.group.gather(top)), k).values[-1]
        if diff is not None:
            m = torch.where(diff.detach() >= threshold, torch.zeros_like(m), m)
        counted -= k
    if diff is None:
        return 0.0
    loss = (diff * m).sum() / max(counted, 1) / parts
    loss.backward()
    return loss.item()


def _tune(block, wrappers, inputs, targets, options, forward, progress, loss_mask, shard=None,
          device=None) -> TuneResult:
    gen = torch.Generator().manual_seed(options.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rounding = [w.v for w in wrappers.values()]
    acts = {k: a for k, w in wrappers.items() if (a := getattr(w, "act", None)) is not None and a.params()}
    act_params = [p for a in acts.values() for p in a.params()]
    minmax = [p for w in wrappers.values() for p in w.factors()] + act_params
    lr = options.learning_rate
    # (parameters, base learning rate): the rounding offsets, then the min/max factors of each kind of layer,
    # then the activation clip ratios (at the min/max learning rate, as the reference moves them)
    groups: list[tuple[list[nn.Parameter], float]] = [(rounding, lr)]
    for scale in sorted({w.default_factor_lr_scale for w in wrappers.values()}):
        params = [p for w in wrappers.values() if w.default_factor_lr_scale == scale for p in w.factors()]
        if params:
            groups.append((params, options.minmax_lr if options.minmax_lr is not None else lr * scale))
    if act_params:
        groups.append((act_params, options.minmax_lr if options.minmax_lr is not None else lr))
    for p in rounding + minmax:
        p.requires_grad_(True)
    adam = None
    if options.enable_adam:
        adam = torch.optim.AdamW([{"params": ps, "lr": base} for ps, base in groups], weight_decay=0)
    n = inputs.shape[0] if shard is None else shard.n
    bs = min(options.batch_size, n)
    steps = options.gradient_accumulate_steps
    sampler = IndexSampler(n, bs * steps, gen)
    target_of = targets if callable(targets) else (lambda idx: targets[idx])
    device = device or next(iter(wrappers.values())).v.device
    # SignRoundV2 below 4 bits: the block loss leaves out its largest elementwise errors
    drop_outliers = options.enable_alg_ext and min(w.scheme.bits for w in wrappers.values()) < 4
    if shard is not None:  # elements of one sample's target per loss-mask position, and positions per sample
        first = target_of(torch.zeros(1, dtype=torch.long))
        positions = first.shape[1] if first.dim() > 1 else 1
        per_position = first[0].numel() // positions
    best_loss, best_state, first_loss, best_iter = math.inf, None, None, 0
    try:
        for it in range(options.iters):
            indices = sampler.next()
            value = 0.0
            parts = [indices[i : i + bs] for i in range(0, len(indices), bs)]
            for idx in parts:
                if shard is not None:
                    value += _sharded_loss(block, forward, inputs, target_of, loss_mask, idx, shard, drop_outliers,
                                           device, options.amp, per_position, positions, len(parts))
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.amp):
                    out = forward(block, inputs[idx].to(device))
                mask = loss_mask[idx].to(device) if loss_mask is not None else None
                loss = masked_mse(out, target_of(idx).to(device), mask, drop_outliers) / len(parts)  # in fp32
                loss.backward()
                value += loss.item()
            if shard is not None and shard.group.active:  # every rank takes the same step
                for p in rounding + minmax:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                total = torch.tensor([value], dtype=torch.float64)
                shard.group.sum_([p.grad for p in rounding + minmax] + [total])
                value = float(total.item())
            if first_loss is None:
                first_loss = value
            if value < best_loss:
                best_loss, best_iter = value, it
                if not options.not_use_best_mse:
                    best_state = {k: w.state() for k, w in wrappers.items()}
                    best_state.update({("act", k): a.state() for k, a in acts.items()})
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
                for a in acts.values():
                    a.clamp_()
            if progress is not None:
                progress(it, value, best_loss)
        if best_state is not None:
            for k, w in wrappers.items():
                w.load(best_state[k])
            for k, a in acts.items():
                a.load(best_state[("act", k)])
        return TuneResult({k: w.quantized() for k, w in wrappers.items()}, first_loss or 0.0, best_loss,
                          {k: a.tuned() for k, a in acts.items()})
    finally:
        for p in rounding + minmax:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
