"""AutoScheme: mixed bits under an average-bits budget (the plan stage's automatic half).

``AutoScheme(avg_bits=3.0, options=("W2A16G64", "W4A16", "W8A16"))`` passed as ``AutoRound(scheme=...)``:
each quantizable layer gets one of the options so that the model's average bits per weight (scales and zero
points counted unless ``ignore_scale_zp_bits``) stays at or below ``avg_bits`` and the summed sensitivity is
smallest.  Sensitivity is ``sensitivity.delta_loss_scores`` (per layer and option, the first-order change of the
model's language-model loss); the choice is an exact multiple-choice knapsack (``choose``) over groups of layers
that must share a scheme (fused q/k/v and gate/up, the experts of one MoE block, ``shared_layers``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import AutoRoundError, SchemeError
from .moe import expert_layer_groups
from .schemes import QuantScheme, resolve_scheme
from ..log import logger

# sibling layers that inference engines fuse into one layer, so they must share a scheme
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("query", "key", "value"),
    ("wq", "wk", "wv"),
)


def fused_siblings(names: Iterable[str]) -> list[list[str]]:
    """The groups (two or more) of ``names`` that inference engines fuse into one layer (q/k/v, gate/up, ...)."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for n in names:
        head, _, leaf = n.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings:
                groups.setdefault((head, siblings), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


# the sensitivity pass's calibration when the AutoScheme does not set it (the reference's defaults)
SCORING_NSAMPLES, SCORING_SEQLEN, SCORING_BATCH_SIZE = 16, 256, 8


@dataclass(frozen=True)
class AutoScheme:
    """The reference tool's ``AutoScheme``.

    ``avg_bits``: the budget, average bits per weight over the quantizable layers.  ``options``: schemes to choose
    from (a comma-separated string, or preset names / ``QuantScheme`` objects / ``"BF16"`` to keep a layer float).
    ``ignore_scale_zp_bits``: count weight bits only.  ``shared_layers``: groups of name patterns (exact names,
    substrings or regexes) whose matching layers in one block get one scheme.  ``nsamples``, ``seqlen``,
    ``batch_size``: the sensitivity pass's calibration (default 16 x 256 tokens in batches of 8, as the
    reference; ``AR_AUTO_SCHEME_NSAMPLES`` / ``AR_AUTO_SCHEME_BATCH_SIZE`` change those defaults); ``dataset``: its text (default: the run's).  ``method``,
    ``device_map``, ``enable_torch_compile``, ``low_gpu_mem_usage``, ``low_cpu_mem_usage``: accepted at their
    defaults (the pass always runs block by block on the model's device); other values are refused."""

    avg_bits: float
    options: Any
    shared_layers: Any = None
    method: str = "default"
    ignore_scale_zp_bits: bool = False
    batch_size: int | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    dataset: Any = None
    device_map: Any = None
    enable_torch_compile: bool | None = None
    low_gpu_mem_usage: bool = True
    low_cpu_mem_usage: bool = True
    schemes: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or self.avg_bits <= 0:
            raise AutoRoundError(
                f"AutoScheme avg_bits must be one positive number such as 3.0, got {self.avg_bits!r} (a list of "
                "targets is not supported: run once per target)"
            )
        object.__setattr__(self, "schemes", tuple(_parse_options(self.options)))
        refused = {
            "method": (self.method, "default"),
            "device_map": (self.device_map, None),
            "enable_torch_compile": (self.enable_torch_compile, None),
            "low_gpu_mem_usage": (self.low_gpu_mem_usage, True),
            "low_cpu_mem_usage": (self.low_cpu_mem_usage, True),
        }
        for name, (value, default) in refused.items():
            if value != default and not (name == "enable_torch_compile" and value is False):
                raise AutoRoundError(
                    f"AutoScheme {name}={value!r} is not supported: the sensitivity pass runs block by block on the "
                    f"model's device (AutoRound's device_map); leave {name} at {default!r}"
                )
        for name in ("batch_size", "nsamples", "seqlen"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AutoRoundError(f"AutoScheme {name} must be a positive integer or None, got {value!r}")
        if self.shared_layers is not None:
            groups = self.shared_layers
            if isinstance(groups, str) or not all(
                isinstance(g, (list, tuple)) and g and all(isinstance(p, str) for p in g) for g in groups
            ):
                raise AutoRoundError(
                    "AutoScheme shared_layers must be a list of groups of name patterns, e.g. "
                    f"[['q_proj', 'k_proj', 'v_proj'], ['fc1', 'fc2']]; got {groups!r}"
                )

    def scoring(self) -> tuple[int, int, int]:
        """(nsamples, seqlen, batch_size) of the sensitivity pass: this AutoScheme's, else the environment's
        (AR_AUTO_SCHEME_NSAMPLES, AR_AUTO_SCHEME_BATCH_SIZE), else the reference's defaults."""
        from .. import envs

        return (
            self.nsamples or envs.AR_AUTO_SCHEME_NSAMPLES or SCORING_NSAMPLES,
            self.seqlen or SCORING_SEQLEN,
            self.batch_size or envs.AR_AUTO_SCHEME_BATCH_SIZE or SCORING_BATCH_SIZE,
        )

    def describe(self) -> str:
        return f"AutoScheme(avg_bits={self.avg_bits}, options={', '.join(option_name(s) for s in self.schemes)})"


def _parse_options(options: Any) -> list[QuantScheme]:
    if isinstance(options, str):
        options = [o for o in options.replace(" ", "").split(",") if o]
    if isinstance(options, QuantScheme):
        options = [options]
    if not isinstance(options, (list, tuple)) or not options:
        raise AutoRoundError(f"AutoScheme options must name at least one scheme, e.g. 'W2A16G64,W4A16'; got {options!r}")
    out: list[QuantScheme] = []
    for opt in options:
        try:
            scheme = resolve_scheme(opt.upper() if isinstance(opt, str) else opt)
        except (SchemeError, ValueError, TypeError) as exc:
            raise AutoRoundError(f"AutoScheme option {opt!r}: {exc}") from None
        if scheme in out:
            logger.info("AutoScheme: option %s given twice; using it once", opt)
            continue
        out.append(scheme)
    return out


def option_name(scheme: QuantScheme) -> str:
    if scheme.is_float:
        return "BF16"
    return scheme.describe()


def layer_bits(scheme: QuantScheme, in_features: int, out_features: int, with_metadata: bool = True) -> int:
    """Bits a layer takes with ``scheme`` (16 per weight when float)."""
    from .dtypes import family_of

    if scheme.is_float:
        return 16 * in_features * out_features
    return family_of(scheme).storage_bits(scheme, in_features, out_features, with_metadata)


# -- groups of layers that share one choice -----------------------------------------------------------------
def _matches(pattern: str, name: str) -> bool:
    if pattern == name or pattern in name:
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def layer_groups(names: Sequence[str], block_names: Sequence[str], shared_layers: Iterable[Sequence[str]] | None = None) -> list[list[str]]:
    """``names`` partitioned into groups that get one scheme each: fused siblings, the experts of one MoE
    layer, and per block the layers matching each ``shared_layers`` group; every other layer alone.  Groups keep
    the order of ``names``."""
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    for group in fused_siblings(names):
        for n in group[1:]:
            union(group[0], n)
    for (moe, _), group in expert_layer_groups(names).items():  # every expert layer of one MoE module
        first = next(x for x in names if x.startswith(moe + "."))
        for n in group:
            union(first, n)

    def block_of(n: str) -> str | None:
        for list_name in block_names:
            if n.startswith(list_name + "."):
                idx = n[len(list_name) + 1 :].split(".", 1)[0]
                return f"{list_name}.{idx}"
        return None

    for group in shared_layers or []:
        matched = [n for n in names if any(_matches(p, n) for p in group)]
        if not matched:
            raise AutoRoundError(
                f"AutoScheme shared_layers group {list(group)!r} matches no quantizable layer; layer names look "
                f"like {names[0]!r}"
            )
        by_block: dict[str | None, list[str]] = {}
        for n in matched:
            by_block.setdefault(block_of(n), []).append(n)
        for members in by_block.values():
            for n in members[1:]:
                union(members[0], n)

    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


# -- the exact choice ---------------------------------------------------------------------------------------
def choose(costs: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], budget: int) -> list[int] | None:
    """The option index per group minimising the summed score with the summed cost at most ``budget``
    (None when even the cheapest choice exceeds it).

    Exact: a dynamic programme over groups keeping the Pareto front of (cost, score) pairs, with the states
    that cannot complete within the budget (the cheapest remaining choices counted) pruned; ties go to the
    lower cost, then to the earlier option."""
    n = len(costs)
    cheapest_rest = np.zeros(n + 1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        cheapest_rest[i] = cheapest_rest[i + 1] + min(costs[i])
    if cheapest_rest[0] > budget:
        return None
    front_cost = np.zeros(1, dtype=np.int64)
    front_score = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for i in range(n):
        c = np.asarray(costs[i], dtype=np.int64)
        s = np.asarray(scores[i], dtype=np.float64)
        k = len(c)
        cost = (front_cost[:, None] + c[None, :]).ravel()
        score = (front_score[:, None] + s[None, :]).ravel()
        parent = np.repeat(np.arange(len(front_cost)), k)
        pick = np.tile(np.arange(k), len(front_cost))
        ok = cost + cheapest_rest[i + 1] <= budget
        cost, score, parent, pick = cost[ok], score[ok], parent[ok], pick[ok]
        order = np.lexsort((pick, score, cost))  # by cost, then score, then option
        cost, score, parent, pick = cost[order], score[order], parent[order], pick[order]
        # keep a state only if its score is strictly below every cheaper-or-equal state's
        best_before = np.minimum.accumulate(np.concatenate(([np.inf], score[:-1])))
        keep = score < best_before
        front_cost, front_score = cost[keep], score[keep]
        parents.append(parent[keep])
        picks.append(pick[keep])
    idx = int(np.argmin(front_score))  # the front is sorted by cost: argmin takes the cheapest of equal scores
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        choice[i] = int(picks[i][idx])
        idx = int(parents[i][idx])
    return choice


@dataclass
class AutoSchemeResult:
    """The chosen scheme per layer, and the budget's accounting."""

    schemes: dict[str, QuantScheme]
    target_bits: float
    achieved_bits: float
    counts: dict[str, int]


def allocate(
    auto: AutoScheme,
    shapes: Mapping[str, tuple[int, int]],
    free: Mapping[str, Sequence[QuantScheme]],
    fixed: Mapping[str, QuantScheme],
    groups: Sequence[Sequence[str]],
    scores: Mapping[str, Sequence[float]],
) -> AutoSchemeResult:
    """Choose an option per group of ``free`` layers.  ``shapes``: name -> (in_features, out_features) of every
    counted layer (free and fixed); ``free[name]``: the layer's scheme under each option (an option may map to
    the layer's shape fallback); ``fixed``: the layers whose scheme is set (``layer_config``, float layers);
    ``scores[name][k]``: the layer's sensitivity under option ``k``."""
    meta = not auto.ignore_scale_zp_bits
    total = sum(i * o for i, o in shapes.values())
    fixed_bits = sum(layer_bits(fixed[n], *shapes[n], meta) for n in fixed)
    costs = [[sum(layer_bits(free[n][k], *shapes[n], meta) for n in g) for k in range(len(auto.schemes))] for g in groups]
    values = [[sum(scores[n][k] for n in g) for k in range(len(auto.schemes))] for g in groups]
    budget = int(np.floor(auto.avg_bits * total + 1e-6)) - fixed_bits
    choice = choose(costs, values, budget)
    if choice is None:
        lowest = (fixed_bits + sum(min(c) for c in costs)) / total
        raise AutoRoundError(
            f"AutoScheme avg_bits={auto.avg_bits} is below the cheapest choice of these options, "
            f"{lowest:.4f} bits per weight (layers fixed by layer_config or kept float included); raise avg_bits "
            "or add a cheaper option"
        )
    schemes = dict(fixed)
    counts: dict[str, int] = {option_name(s): 0 for s in auto.schemes}
    for g, k in zip(groups, choice):
        for n in g:
            schemes[n] = free[n][k]
            counts[option_name(auto.schemes[k])] += 1
    achieved = sum(layer_bits(schemes[n], *shapes[n], meta) for n in shapes) / total
    return AutoSchemeResult(schemes, auto.avg_bits, achieved, counts)


def bits_range(
    auto: AutoScheme,
    shapes: Mapping[str, tuple[int, int]],
    free: Mapping[str, Sequence[QuantScheme]],
    fixed: Mapping[str, QuantScheme],
) -> tuple[float, float]:
    """(lowest, highest) average bits these options can reach."""
    meta = not auto.ignore_scale_zp_bits
    total = sum(i * o for i, o in shapes.values())
    fixed_bits = sum(layer_bits(fixed[n], *shapes[n], meta) for n in fixed)
    per_layer = {n: [layer_bits(s, *shapes[n], meta) for s in free[n]] for n in free}
    low = fixed_bits + sum(min(v) for v in per_layer.values())
    high = fixed_bits + sum(max(v) for v in per_layer.values())
    return low / total, high / total


def check_options(auto: AutoScheme, formats: Sequence[Any]) -> None:
    """Refuse, before any work, an option a format cannot write, and mixed options in a one-scheme format."""
    from .errors import FormatError

    quantized = [s for s in auto.schemes if not s.is_float]
    for fmt in formats:
        mix = fmt.mix_error(quantized)
        if mix:
            raise FormatError(mix)
        if fmt.uniform and len(quantized) > 1:
            raise AutoRoundError(
                f"format {fmt.name!r} holds one scheme for every quantized layer, so AutoScheme cannot mix "
                f"{', '.join(option_name(s) for s in quantized)} in it; choose auto_round, auto_gptq or fake"
            )
        # a GGUF file holds a type per tensor: each layer gets the type its option's file type gives that tensor
        # (llama.cpp's rules), and the file claims the format's file type
        per_tensor = fmt.name.startswith("gguf:") and not fmt.float_model_ok
        for s in quantized:
            err = fmt.scheme_error(s)
            if err is None and not per_tensor:
                try:
                    fmt.adapt_scheme(s, switch=False)
                except FormatError as exc:
                    err = str(exc)
            if err:
                raise AutoRoundError(f"AutoScheme option {option_name(s)} cannot be written as {fmt.name!r}: {err}")


def auto_candidates(
    auto: AutoScheme,
    linears: Mapping[str, Any],
    layer_config: Mapping[str, Any] | None,
    ignore_layers: Sequence[str],
    formats: Sequence[Any],
) -> tuple[dict[str, list[QuantScheme]], dict[str, QuantScheme]]:
    """(free, fixed): each free layer's scheme under every option (after shape fallbacks; float where a format
    cannot pack the shape), and the scheme of each layer that ``layer_config`` or ``ignore_layers`` sets (a
    ``layer_config`` dict such as ``{"bits": 8}`` applies to the first quantized option)."""
    from .plan import _match, fitted_scheme, layer_bases, layer_config_entry, scheme_for_layer

    float_scheme = resolve_scheme("BF16")
    base_option = next(s for s in auto.schemes if not s.is_float)
    bases = [layer_bases(linears, s) for s in auto.schemes]
    free: dict[str, list[QuantScheme]] = {}
    fixed: dict[str, QuantScheme] = {}
    for name, module in linears.items():
        if ignore_layers and any(_match(k, name) for k in ignore_layers):
            fixed[name] = float_scheme
            continue
        if layer_config_entry(name, layer_config) is not None:
            s = scheme_for_layer(name, base_option, layer_config)
            fixed[name] = fitted_scheme(name, module, s, list(formats))
            continue
        free[name] = [fitted_scheme(name, module, b.get(name, s), list(formats)) for s, b in zip(auto.schemes, bases)]
    if not free:
        raise AutoRoundError("AutoScheme has no layer to choose for: layer_config or ignore_layers sets every layer")
    return free, fixed
