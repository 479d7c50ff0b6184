"""Mixture-of-experts models whose experts transformers 5 fuses into 3-D parameters (Mixtral, Qwen2/3-MoE,
DeepSeek-V3, OLMoE: ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``).

Each fused experts module is replaced by ``UnfusedExperts``: one ``ExpertMLP`` per expert with ordinary
``gate_proj`` / ``up_proj`` / ``down_proj`` linear layers holding the same weights, computing the same output for
the same routing, so every expert is planned, calibrated, tuned and exported as its own linear layers
(``model.layers.0.mlp.experts.3.up_proj``).  Routers stay float (they are not linear layers of the block).

Exports: ``auto_round`` writes each expert's packed layers under those names and our transformers loader unfuses
the model it builds before loading them; ``fake`` fuses the dequantized experts back into the model's own 3-D
parameters (an ordinary checkpoint).  Formats whose readers expect other expert layouts refuse MoE models before
any work.  An expert that no calibration token is routed to is quantized without importance (plain RTN
ranges; SignRound leaves its rounding untouched) and named in a log line; a static activation scale it needs is
the largest of the same layer's in the other experts (``act_quant.static_amax``).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import AutoRoundError


# an expert's linear layer by name, full or relative to its block: ``<moe>.experts.<index>.<layer>``
_EXPERT_LAYER = re.compile(r"^(?P<moe>(?:.*\.)?experts)\.\d+\.(?P<layer>.+)$")
# the expert layers that take the MoE module's input (FP8 dispatch quantizes it once for all experts)
INPUT_PROJECTIONS = ("gate_proj", "up_proj")


def is_input_projection(layer: str) -> bool:
    """Whether an expert layer (a name relative to its expert, e.g. ``mlp.gate_proj`` or ``gate_proj``) takes the
    MoE module's input."""
    return layer.rsplit(".", 1)[-1] in INPUT_PROJECTIONS


def expert_layer_groups(names: Iterable[str]) -> dict[tuple[str, str], list[str]]:
    """The same layer of every expert of one MoE module, keyed by (experts module, layer): e.g.
    ``("mlp.experts", "up_proj") -> ["mlp.experts.0.up_proj", "mlp.experts.1.up_proj", ...]``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        m = _EXPERT_LAYER.match(n)
        if m:
            groups.setdefault((m["moe"], m["layer"]), []).append(n)
    return groups


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, **kw), nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE block as separate modules, called as transformers' fused experts module is:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__([ExpertMLP(hidden, inter, act_fn, device, dtype) for _ in range(num_experts)])
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    @torch.no_grad()
    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]``) from the experts' current weights."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight], 0) for e in self])
        return gate_up, torch.stack([e.down_proj.weight for e in self])


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding experts as 3-D ``gate_up_proj`` / ``down_proj`` parameters."""
    found = []
    for name, module in model.named_modules():
        gu, dp = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.dim() == 3:
            found.append((name, module))
    return found


def _layout_error(name: str, module: nn.Module) -> str | None:
    gu, dp = module.gate_up_proj, module.down_proj
    what = f"MoE experts {name} ({type(module).__name__}: gate_up_proj {tuple(gu.shape)}, down_proj {tuple(dp.shape)})"
    if any(getattr(module, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")) or getattr(
        module, "is_transposed", False
    ):
        return f"{what}: biased or transposed expert layouts (gpt-oss) are not supported yet"
    if not isinstance(getattr(module, "act_fn", None), nn.Module):
        return f"{what}: no act_fn module, so the expert's activation is unknown"
    if dp.dim() != 3 or gu.shape[0] != dp.shape[0] or gu.shape[1] != 2 * dp.shape[2] or gu.shape[2] != dp.shape[1]:
        return f"{what}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I] (experts of one shape)"
    return None


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def router_linears(linears: dict, expert_modules: list[str]) -> list[str]:
    """The linear layers of ``linears`` that route tokens in an MoE block (siblings of an experts module named
    ``gate`` / ``router`` / ``shared_expert_gate``)."""
    blocks = {name.rpartition(".")[0] for name in expert_modules}
    return [n for n in linears if n.rpartition(".")[0] in blocks and n.rpartition(".")[2] in ROUTER_NAMES]


def unfuse_experts(model: nn.Module, check: bool = True, only: "set[str] | None" = None) -> list[str]:
    """Replace every fused experts module of ``model`` by an ``UnfusedExperts`` with the same weights (on the same
    device; meta stays meta); returns their names.  ``only``: just these modules.  ``check``: run both on random routed tokens first and refuse
    a module whose output the unfused one does not reproduce."""
    names = []
    for name, module in fused_experts(model):
        if only is not None and name not in only:
            continue
        err = _layout_error(name, module)
        if err:
            raise AutoRoundError(f"{err}; this model cannot be quantized expert by expert here")
        gu, dp = module.gate_up_proj, module.down_proj
        n, inter, hidden = gu.shape[0], dp.shape[2], dp.shape[1]
        new = UnfusedExperts(n, hidden, inter, module.act_fn, device=gu.device, dtype=gu.dtype)
        if gu.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(new):
                    expert.gate_proj.weight.copy_(gu[e, :inter])
                    expert.up_proj.weight.copy_(gu[e, inter:])
                    expert.down_proj.weight.copy_(dp[e])
            if check:
                _check_same(name, module, new, hidden)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        names.append(name)
    return names


@torch.no_grad()
def _check_same(name: str, fused: nn.Module, unfused: UnfusedExperts, hidden: int) -> None:
    g = torch.Generator().manual_seed(0)
    k = min(2, unfused.num_experts)
    tokens = 4 * unfused.num_experts
    x = torch.randn(tokens, hidden, generator=g).to(fused.gate_up_proj.device, fused.gate_up_proj.dtype)
    idx = torch.stack([torch.randperm(unfused.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).to(x.dtype)
    idx, w = idx.to(x.device), w.to(x.device)
    want, got = fused(x, idx, w), unfused(x, idx, w)
    if not torch.allclose(want, got, rtol=1e-3, atol=1e-3 * float(want.abs().max().clamp_min(1e-6))):
        raise AutoRoundError(
            f"MoE experts {name} ({type(fused).__name__}) do not compute down(act(gate(x)) * up(x)) with "
            "gate_up_proj = [gate; up] as expected; this model cannot be quantized expert by expert here"
        )


def fuse_back_tensors(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` (a checkpoint's (name, tensor) stream) with every ``UnfusedExperts``' per-expert weights
    fused back into ``<experts>.gate_up_proj`` / ``<experts>.down_proj`` (the model class's own layout)."""
    groups = {name: m for name, m in model.named_modules() if isinstance(m, UnfusedExperts)}
    if not groups:
        yield from tensors
        return
    held: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groups}
    for name, t in tensors:
        owner = next((g for g in groups if name.startswith(g + ".")), None)
        if owner is None:
            yield name, t
            continue
        held[owner][name[len(owner) + 1:]] = t
        m = groups[owner]
        if len(held[owner]) == 3 * m.num_experts:
            parts = held.pop(owner)
            try:
                gate_up = torch.stack([torch.cat([parts[f"{e}.gate_proj.weight"], parts[f"{e}.up_proj.weight"]], 0)
                                       for e in range(m.num_experts)])
                down = torch.stack([parts[f"{e}.down_proj.weight"] for e in range(m.num_experts)])
            except KeyError as exc:
                raise AutoRoundError(f"cannot fuse the experts of {owner} back: {exc} is not a float weight") from None
            yield f"{owner}.gate_up_proj", gate_up
            yield f"{owner}.down_proj", down
    if held:
        raise AutoRoundError(f"the experts of {', '.join(held)} were not all written; cannot fuse them back")
