"""Per-layer sensitivity to each quantization option, for AutoScheme: the DeltaLoss of SignRoundV2.

For an option, every scored layer's weight is replaced by its round-to-nearest value ``Ŵ`` under that option
(importance-weighted when the run ends with optimized RTN or SignRound; the layers ``fixed`` by ``layer_config``
by theirs), the model's language-model loss ``L`` on the calibration
tokens is computed, and a layer's score is ``sum |dL/dŴ ⊙ (W - Ŵ)|``, the first-order estimate of what
quantizing it costs, accumulated batch by batch.

Memory stays near one block: the forward runs block by block keeping only each block's inputs (on
``cache_device``), and the backward goes from the loss back through the blocks one at a time, recomputing a
block's forward with its quantized weights as leaves that collect gradients.  Under streamed tuning
(``stream``: ``streaming.StreamedModel``) a block's weights are read from the checkpoint files each time it is
used and dropped after, so only one block's float weights are ever in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import capture_block_inputs
from .block_runner import first_output
from .data import whole_batches
from .dtypes import family_of
from .errors import AutoRoundError
from .importance import ImportanceHooks
from .schemes import QuantScheme


@contextmanager
def _weights_of(stream: Any, name: str, block: nn.Module, device: torch.device) -> Iterator[None]:
    """``block``'s weights for the body of the ``with``: when streamed, read from the files, moved to ``device``
    (where the activations are: an accelerator when the model stays in host memory) and dropped after."""
    if stream is None:
        yield
        return
    stream.open_block(name, block)
    try:
        block.to(device)
        yield
    finally:
        stream.drop_block(block)


@torch.no_grad()
def streamed_importance(
    model: nn.Module,
    blocks: Sequence[tuple[str, nn.Module]],
    linears: Mapping[str, nn.Linear],
    tokens: torch.Tensor,
    batch_size: int,
    stream: Any,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """``importance.model_importance`` for a streamed model: the float forward runs block by block from the
    captured inputs of the first block, each block's weights read in for its turn."""
    if group is not None and group.active:
        from .distributed import Shard

        tokens = Shard(group, len(tokens)).rows(tokens)
    x, kwargs = capture_block_inputs(model, blocks[0][1], tokens, batch_size)
    device = x.device
    result: dict[str, torch.Tensor] = {}
    for block_name, block in tqdm(blocks, desc="calibration statistics", leave=False):
        names = [n[len(block_name) + 1:] for n in linears if n.startswith(block_name + ".")]
        with _weights_of(stream, block_name, block, device), ImportanceHooks.of_block(block, names) as hooks:
            x = torch.cat([first_output(block(x[i : i + batch_size].to(device), **kwargs))
                           for i in range(0, len(x), batch_size)])
        result.update({f"{block_name}.{n}": v for n, v in hooks.reduce(group).result().items()})
    return result


def _rtn(weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None) -> torch.Tensor:
    return family_of(scheme).quantize(weight.detach(), scheme, importance).dequantize().to(weight.dtype)


class _Swap:
    """Gives ``layers`` their quantized weights (as leaves that collect gradients) and restores the float ones.
    ``importance``: layers quantized with their family's importance-weighted RTN rather than plain RTN."""

    def __init__(self, modules: Mapping[str, nn.Linear], schemes: Mapping[str, QuantScheme],
                 importance: Mapping[str, torch.Tensor]) -> None:
        self.modules = {n: modules[n] for n in schemes}
        self.schemes, self.importance = schemes, importance
        self.float: dict[str, nn.Parameter] = {}
        self.quant: dict[str, nn.Parameter] = {}

    def __enter__(self) -> "_Swap":
        for n, m in self.modules.items():
            self.float[n] = m.weight
            q = nn.Parameter(_rtn(m.weight, self.schemes[n], self.importance.get(n)), requires_grad=True)
            self.quant[n] = q
            m.weight = q
        return self

    def __exit__(self, *exc) -> None:
        for n, m in self.modules.items():
            m.weight = self.float[n]
        self.float, self.quant = {}, {}

    def accumulate(self, scores: dict[str, float], names: Sequence[str]) -> None:
        """Add each named layer's ``sum |grad ⊙ (W - Ŵ)|`` and clear its gradient."""
        with torch.no_grad():
            for n in names:
                q = self.quant[n]
                if q.grad is not None:
                    scores[n] += float((q.grad * (self.float[n] - q)).abs().sum())
                    q.grad = None


def delta_loss_scores(
    model: nn.Module,
    blocks: Sequence[tuple[str, nn.Module]],
    linears: Mapping[str, nn.Linear],
    option_schemes: Sequence[Mapping[str, QuantScheme | None]],
    fixed: Mapping[str, QuantScheme],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int,
    head: tuple[nn.Module, nn.Module, str | None],
    cache_device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    group: Any = None,
    stream: Any = None,
) -> dict[str, list[float]]:
    """``scores[layer][k]`` for every layer named in ``option_schemes[k]`` (its scheme under option ``k``;
    None = kept float, score 0).  ``fixed``: quantized with these schemes under every option.  ``head``:
    (final norm, output projection, the projection's layer name when it is scored or fixed, else None).
    ``importance``: per-layer input importance; the layers it names get the importance-weighted RTN (the
    quantizer the run ends with under optimized RTN) instead of plain RTN.  ``group`` (``distributed.Group``,
    torchrun): rank r scores batches r, r + N, ... and the scores are summed over the ranks; every score is a sum
    over batches, so the result is one process's up to the order of that sum.  ``stream``: the streamed model
    whose blocks are read in when used (``streaming.StreamedModel``), or None when the model is in memory."""
    names = sorted({n for o in option_schemes for n in o})
    scores = {n: [0.0] * len(option_schemes) for n in names}
    bs, n = whole_batches(len(tokens), batch_size)
    tokens, mask = tokens[:n], mask[:n]
    if group is not None and group.active:
        mine = [b for b in range(n // bs) if b % group.world_size == group.rank]
        if not mine:
            raise AutoRoundError(
                f"AutoScheme: {n // bs} scoring batches cannot be split across {group.world_size} ranks; raise "
                "AutoScheme(nsamples=...) or lower its batch_size, or start fewer processes"
            )
        rows = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in mine])
        tokens, mask = tokens[rows], mask[rows]
    x0, kwargs = capture_block_inputs(model, blocks[0][1], tokens, bs)
    device = x0.device
    store = torch.device(cache_device) if cache_device is not None else device
    x0 = x0.to(store)
    norm, proj, head_name = head
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for k, option in enumerate(option_schemes):
            quantized = {n: s for n, s in option.items() if s is not None}
            if not quantized:
                continue  # every scored layer stays float under this option: its scores are 0
            schemes = {**{n: s for n, s in fixed.items() if not s.is_float}, **quantized}
            per = {n: 0.0 for n in quantized}
            _option_pass(blocks, linears, schemes, list(quantized), per, x0, kwargs, tokens, mask, bs, device, store,
                         norm, proj, head_name, dict(importance or {}), stream,
                         desc=f"sensitivity {k + 1}/{len(option_schemes)}")
            for n, v in per.items():
                scores[n][k] = v
            if progress is not None:
                progress(f"option {k + 1} of {len(option_schemes)} scored")
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
    if group is not None and group.active:
        total = torch.tensor([scores[n] for n in names], dtype=torch.float64)
        group.sum_([total])
        scores = {n: total[i].tolist() for i, n in enumerate(names)}
    return scores


def _block_layers(block_name: str, schemes: Mapping[str, QuantScheme]) -> dict[str, QuantScheme]:
    return {n: s for n, s in schemes.items() if n.startswith(block_name + ".")}


def _option_pass(blocks, linears, schemes, scored, per, x0, kwargs, tokens, mask, bs, device, store, norm, proj,
                 head_name, importance, stream, desc):
    """One option: the quantized forward, the loss, and the backward block by block."""
    inputs: list[torch.Tensor] = []
    x = x0
    bar = tqdm(total=2 * len(blocks) + 1, desc=desc, leave=False)
    with torch.no_grad():
        for block_name, block in blocks:
            inputs.append(x)
            with _weights_of(stream, block_name, block, device), \
                    _Swap(linears, _block_layers(block_name, schemes), importance):
                x = torch.cat([
                    first_output(block(x[i : i + bs].to(device), **kwargs)).to(store) for i in range(0, len(x), bs)
                ])
            bar.update()
    # the loss and its gradient at the last block's outputs
    head_schemes = {head_name: schemes[head_name]} if head_name in schemes else {}
    grads = []
    with _Swap(linears, head_schemes, importance) as swap:
        for i in range(0, len(x), bs):
            h = x[i : i + bs].to(device).requires_grad_(True)
            ids, m = tokens[i : i + bs].to(device), mask[i : i + bs].to(device)
            keep = m[:, :-1] & m[:, 1:]
            count = max(int(keep.sum()), 1)
            # the batch's mean next-token loss, backpropagated one sample at a time: the logits of a whole batch
            # (batch x seqlen x vocabulary) would dominate the memory
            for j in range(len(h)):
                logits = proj(norm(h[j : j + 1])).float()[0, :-1]
                ce = nn.functional.cross_entropy(logits[keep[j]], ids[j, 1:][keep[j]], reduction="sum")
                (ce / count).backward()
            grads.append(h.grad.to(store))
            swap.accumulate(per, [head_name] if head_name in per else [])
    bar.update()
    del x
    for (block_name, block), x in zip(reversed(blocks), reversed(inputs)):
        layers = _block_layers(block_name, schemes)
        mine = [n for n in scored if n in layers]
        new_grads = []
        with _weights_of(stream, block_name, block, device), _Swap(linears, layers, importance) as swap:
            for j, i in enumerate(range(0, len(x), bs)):
                xi = x[i : i + bs].to(device).requires_grad_(True)
                out = first_output(block(xi, **kwargs))
                out.backward(grads[j].to(device))
                new_grads.append(xi.grad.to(store))
                swap.accumulate(per, mine)
        grads = new_grads
        bar.update()
    bar.close()
