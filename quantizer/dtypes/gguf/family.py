"""The GGUF weight family (``data_type="gguf:<type>"``): llama.cpp block types (q4_0 ... q6_k, iq4_nl) for one
layer, or a llama.cpp file type (q4_k_m ...) as the model default, whose per-layer types follow llama.cpp's
rules (``types.plan_types``).  RTN and optimized RTN are llama.cpp's reference and importance-weighted
quantizers; SignRound tunes in the block structure (``tune``); the packed weight is ``GGUFWeight``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ...errors import SchemeError
from ...qmath import ROUND_WITH_COMPUTED
from ....log import logger
from ... import schemes as _schemes  # a module object: schemes imports this registry while it loads
from .. import WeightFamily, register_family
from ..integer import TunedIntLinear
from . import GGML_TYPES, GGUF_FILE_TYPES, GGUFWeight, fit_row, quantize_tensor
from . import tune as gguf_tune
from .types import plan_types

if TYPE_CHECKING:  # pragma: no cover
    from ...schemes import QuantScheme

GGUF_PREFIX = "gguf:"


def _block_type(data_type: str) -> str:
    """The block type behind a ``gguf:`` data type (a file type stands for its default block type)."""
    name = data_type[len(GGUF_PREFIX):]
    return GGUF_FILE_TYPES[name].default_type if name in GGUF_FILE_TYPES else name


def gguf_scheme(name: str) -> QuantScheme:
    """The scheme of a llama.cpp block type or file type, e.g. ``gguf_scheme("q4_k_m")``."""
    t = GGML_TYPES[_block_type(GGUF_PREFIX + name)]
    if t.is_float:
        return _schemes.FLOAT
    return _schemes.QuantScheme(bits=t.bits, group_size=t.group_size, sym=t.sym, data_type=GGUF_PREFIX + name)


def gguf_type_of(scheme: QuantScheme) -> str | None:
    """The llama.cpp block type of a layer scheme (None for schemes of other families)."""
    if not scheme.data_type.startswith(GGUF_PREFIX):
        return None
    return _block_type(scheme.data_type)


def gguf_file_type_of(scheme: QuantScheme) -> str | None:
    """The llama.cpp file type a model-level GGUF scheme names (None if it names a bare block type)."""
    if not scheme.data_type.startswith(GGUF_PREFIX):
        return None
    name = scheme.data_type[len(GGUF_PREFIX):]
    return name if name in GGUF_FILE_TYPES else None


class TunedGGUFLinear(TunedIntLinear):
    """A linear layer of a llama.cpp block type, tuned in that type's block structure (``tune``): v acts
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



class GGUFFamily(WeightFamily):
    name = "gguf"
    weight_type = GGUFWeight

    def data_types(self) -> tuple[str, ...]:
        names = [*(t for t, v in GGML_TYPES.items() if not v.is_float), *GGUF_FILE_TYPES]
        return tuple(GGUF_PREFIX + n for n in dict.fromkeys(names) if n not in ("f16", "bf16"))

    def validate(self, scheme: QuantScheme) -> None:
        t = GGML_TYPES[_block_type(scheme.data_type)]
        if (scheme.bits, scheme.group_size, scheme.sym) != (t.bits, t.group_size, t.sym):
            raise SchemeError(
                f"data_type {scheme.data_type} fixes bits={t.bits}, group_size={t.group_size}, sym={t.sym}; "
                f"got bits={scheme.bits}, group_size={scheme.group_size}, sym={scheme.sym}. Pick another GGUF "
                f"scheme instead of overriding ({', '.join(n for n in _schemes.PRESETS if n.startswith('GGUF:'))})"
            )

    def type_name(self, scheme: QuantScheme) -> str:
        return gguf_type_of(scheme)

    def describe(self, scheme: QuantScheme) -> str:
        return f"GGUF {scheme.data_type[len(GGUF_PREFIX):].upper()} (W{scheme.bits}A{scheme.act_bits} llama.cpp blocks)"

    def presets(self) -> dict[str, QuantScheme]:
        # as the reference tool spells them: one per llama.cpp file type
        return {f"GGUF:{ft.upper()}": gguf_scheme(ft) for ft in GGUF_FILE_TYPES}

    def layer_schemes(self, shapes: Mapping[str, tuple[int, int]], default: QuantScheme) -> dict[str, QuantScheme]:
        ftype = gguf_file_type_of(default) or gguf_type_of(default)
        return {n: gguf_scheme(t) for n, t in plan_types(shapes, ftype).items()}

    def fit(self, name: str, scheme: QuantScheme, in_features: int) -> QuantScheme:
        """A block type whose block does not divide the rows falls back as llama.cpp does (q4_k -> q5_0 ...)."""
        qtype = gguf_type_of(scheme)
        new = fit_row(qtype, in_features)
        if new == qtype:
            return scheme
        logger.info("%s: %d input features do not fit %s blocks; using %s as llama.cpp does", name, in_features, qtype, new)
        return gguf_scheme(new)

    def storage_bits(self, scheme: QuantScheme, in_features: int, out_features: int,
                     with_metadata: bool = True) -> int:
        """ggml's block bytes (scales and mins included); without metadata, the nominal weight bits."""
        t = GGML_TYPES[fit_row(gguf_type_of(scheme), in_features)]
        if not with_metadata:
            return t.bits * in_features * out_features
        return out_features * -(-in_features // t.block_size) * t.type_size * 8

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None,
                 search_lowest: float = 0.7, global_amax: torch.Tensor | None = None,
                 rtn_rounding: str = ROUND_WITH_COMPUTED) -> GGUFWeight:
        qtype = gguf_type_of(scheme)
        return GGUFWeight(quantize_tensor(weight, qtype, importance), qtype, tuple(weight.shape))

    def tuning_importance(self, scheme: QuantScheme, options) -> bool:
        return True  # tuning starts from the importance-weighted iters-0 blocks (measured on the tuning inputs)

    def tuner(self, linear: nn.Linear, scheme: QuantScheme, options, importance: torch.Tensor | None,
              global_amax: torch.Tensor | None = None):
        if not gguf_tune.tunable(gguf_type_of(scheme)):
            return None  # iq4_nl's non-linear table: the iters-0 quantizer
        return TunedGGUFLinear(linear, scheme, options.enable_minmax_tuning, importance)


register_family(GGUFFamily())
