"""SignRound on llama.cpp block types: every GGUF type is tuned as its integer equivalent in llama.cpp's block
structure, and the tuned integers and scales are encoded exactly into the GGUF blocks.  Pure tensor code: it
imports no model code.

Each tunable type decodes, per group (a 32-block, or a k-quant sub-block of 16 or 32 weights), as
``value = S * I + B`` with an integer ``I`` (ggml's own float32 decoding, operation for operation):

  type   I range      S (group scale)                   B (group offset)       stored integer
  q4_0   -8..7        d                                 -                      I + 8
  q5_0   -16..15      d                                 -                      I + 16
  q8_0   -128..127    d                                 -                      I (int8)
  q4_1   0..15        d                                 m                      I
  q5_1   0..31        d                                 m                      I
  q2_k   0..3         d * sc, sc in 0..15               -(dmin * m), m 0..15   I
  q3_k   -4..3        d * sc, sc in -32..31             -                      I + 4 (scale sc + 32)
  q4_k   0..15        d * sc, sc in 0..63               -(dmin * m), m 0..63   I
  q5_k   0..31        d * sc, sc in 0..63               -(dmin * m), m 0..63   I
  q6_k   -32..31      d * sc, sc in -128..127           -                      I + 32

d, dmin, m (q4_1/q5_1) are fp16; k-quant sub-block scales ``sc`` and mins ``m`` are integers against the
super-block's fp16 ``d``/``dmin`` ("double quantization").

Tuning starts from the iters-0 result (llama.cpp's scale search, importance-weighted when an importance is
given): its per-group scale ``S0`` and offset ``B0`` (and the k-quants' super-block ``d0``/``dmin0``) are read
back from its blocks (``initial_params``).  The learned parameters of a ``[rows, cols]`` weight are
- ``v`` ``[rows, cols]``: rounding offsets added before rounding the weight integers (kept in [-0.5, 0.5]);
- ``alpha`` ``[rows, groups, 1]``: a factor on each group's scale ``S0``;
- ``beta`` ``[rows, groups, 1]``: a factor on each group's offset ``B0`` (asymmetric types only);
the factors are kept in ``[FACTOR_MIN, FACTOR_MAX]``.  Every forward pass re-derives what the file stores
(``fake_quantize``): 32-blocks round ``S0*alpha`` (and ``B0*beta``) to fp16; k-quants round each sub-block
scale ``S0*alpha`` to its integer grid against a super-block ``d = fp16(d0 * max|S| / max|S0|)`` (so with
``alpha`` = 1 the iters-0 integers come back exactly) and likewise the mins against ``dmin``; then
``I = clamp(round((w - B) / S + v))``.  Rounding uses straight-through gradients (forward values are exact).
``encode`` runs the same computation without gradients and packs the integers into ggml's byte layout; the
blocks decode (``dequantize_tensor`` and the ``gguf`` package alike) to the forward pass's weights
bit for bit, which ``encode`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import gguf as gq

FACTOR_MIN, FACTOR_MAX = 0.5, 1.5
# Without an explicit minmax_lr the factors move at this fraction of the rounding learning rate: they start at
# the scales llama.cpp's search chose, and a step of lr (e.g. 2% of every scale at once) overshoots them.
FACTOR_LR_SCALE = 0.1


@dataclass(frozen=True)
class _Spec:
    lo: int  # weight integer range
    hi: int
    zp: int  # stored integer = I + zp
    offset: bool  # has a per-group offset B (asymmetric)
    sc_lo: int = 0  # k-quants: sub-block scale integer range
    sc_hi: int = 0
    m_hi: int = 0  # k-quants with mins: sub-block min integer range 0..m_hi


SPECS: dict[str, _Spec] = {
    "q4_0": _Spec(-8, 7, 8, False),
    "q5_0": _Spec(-16, 15, 16, False),
    "q8_0": _Spec(-128, 127, 0, False),
    "q4_1": _Spec(0, 15, 0, True),
    "q5_1": _Spec(0, 31, 0, True),
    "q2_k": _Spec(0, 3, 0, True, 0, 15, 15),
    "q3_k": _Spec(-4, 3, 4, False, -32, 31),
    "q4_k": _Spec(0, 15, 0, True, 0, 63, 63),
    "q5_k": _Spec(0, 31, 0, True, 0, 63, 63),
    "q6_k": _Spec(-32, 31, 32, False, -128, 127),
}
TUNABLE_TYPES = tuple(SPECS)


def tunable(qtype: str) -> bool:
    """Whether SignRound tunes ``qtype`` (iq4_nl's non-linear table and float types are not tuned)."""
    return qtype in SPECS


def has_offset(qtype: str) -> bool:
    return SPECS[qtype].offset


def _is_k(qtype: str) -> bool:
    return gq.GGML_TYPES[qtype].block_size == gq.QK_K


class _Round(torch.autograd.Function):
    """round half to even (as llama.cpp's nearest_int) with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _F16(torch.autograd.Function):
    """Round float32 to the nearest fp16 value (kept in float32) with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, x, torch.ones_like(x))


@dataclass
class GGUFInit:
    """The iters-0 starting point of one ``[rows, cols]`` weight: per-group scale ``scale`` and offset
    ``offset`` (``[rows, groups]``; offset None for symmetric types) and, for k-quants, the super-block
    ``d``/``dmin`` (``[rows, super-blocks]``)."""

    qtype: str
    scale: torch.Tensor
    offset: torch.Tensor | None
    d: torch.Tensor | None = None
    dmin: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "GGUFInit":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GGUFInit(self.qtype, mv(self.scale), mv(self.offset), mv(self.d), mv(self.dmin))


def block_params(blocks: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(S, B, d, dmin) of uint8 blocks ``[nb, type_size]``: S/B ``[nb, groups per block]`` as ggml computes them
    (``d * sc`` in float32), d/dmin ``[nb]`` for k-quants (None otherwise)."""
    b = blocks
    f16 = gq._bytes_f16
    if qtype in ("q4_0", "q5_0", "q8_0"):
        return f16(b[:, :2]), None, None, None
    if qtype in ("q4_1", "q5_1"):
        return f16(b[:, :2]), f16(b[:, 2:4]), None, None
    if qtype == "q2_k":
        sc = b[:, :16].to(torch.int32)
        d, dmin = f16(b[:, 80:82]), f16(b[:, 82:84])
        return d * (sc & 15).to(torch.float32), -(dmin * (sc >> 4).to(torch.float32)), d[:, 0], dmin[:, 0]
    if qtype == "q3_k":
        d = f16(b[:, 108:110])
        return d * gq.unpack_q3_scales(b[:, 96:108]).to(torch.float32), None, d[:, 0], None
    if qtype in ("q4_k", "q5_k"):
        d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
        sc, m = gq.unpack_kscales(b[:, 4:16])
        return d * sc.to(torch.float32), -(dmin * m.to(torch.float32)), d[:, 0], dmin[:, 0]
    if qtype == "q6_k":
        d = f16(b[:, 208:210])
        return d * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32), None, d[:, 0], None
    raise ValueError(f"SignRound cannot tune ggml type {qtype!r}; tunable types: {', '.join(TUNABLE_TYPES)}")


def initial_params(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> GGUFInit:
    """Quantize ``w`` ``[rows, cols]`` with the iters-0 quantizer (``quantize_tensor``) and read its
    group scales/offsets back as the starting point of the tuning (on ``w``'s device)."""
    if not tunable(qtype):
        raise ValueError(f"SignRound cannot tune ggml type {qtype!r}; tunable types: {', '.join(TUNABLE_TYPES)}")
    t = gq.GGML_TYPES[qtype]
    rows, cols = w.shape
    if cols % t.block_size:
        raise ValueError(f"a row of {cols} values is not a multiple of the {qtype} block size {t.block_size}")
    blocks = gq.quantize_tensor(w, qtype, importance).reshape(-1, t.type_size)
    s, b, d, dmin = block_params(blocks, qtype)
    shape = lambda x, n: None if x is None else x.reshape(rows, n)  # noqa: E731
    groups, supers = cols // t.group_size, cols // t.block_size
    init = GGUFInit(qtype, shape(s, groups), shape(b, groups), shape(d, supers), shape(dmin, supers))
    return init.to(w.device)


def _super_scale(s: torch.Tensor, s0: torch.Tensor, d0: torch.Tensor) -> torch.Tensor:
    """fp16 super-block scale ``d0 * max|s| / max|s0|`` ([rows, supers, 1]); exactly ``d0`` while s == s0."""
    amax = s.abs().amax(-1, keepdim=True)
    amax0 = s0.abs().amax(-1, keepdim=True)
    return _F16.apply(d0.unsqueeze(-1) * (amax / _safe(amax0)))


def _to_grid(s: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integers ``clamp(round(s / d), lo, hi)`` (0 where d is 0), straight-through."""
    q = torch.clamp(_Round.apply(s / _safe(d)), lo, hi)
    return torch.where(d != 0, q, torch.zeros_like(q))


def fake_quantize(
    w: torch.Tensor,
    init: GGUFInit,
    v: torch.Tensor | float = 0.0,
    alpha: torch.Tensor | float = 1.0,
    beta: torch.Tensor | float = 1.0,
    parts: bool = False,
):
    """The weight ``[rows, cols]`` (float32) the GGUF blocks of these parameters decode to, differentiable in
    ``v``/``alpha``/``beta``.  With ``parts``: ``(value, stored)``, ``stored`` holding what the blocks store
    (``d``, ``dmin``, ``m``, ``sc`` and the stored integers ``q``, shaped per block)."""
    qtype = init.qtype
    spec, t = SPECS[qtype], gq.GGML_TYPES[qtype]
    rows, cols = w.shape
    gs = t.group_size
    groups = cols // gs
    xs = w.to(torch.float32).reshape(rows, groups, gs)
    s = init.scale.unsqueeze(-1) * alpha  # [rows, groups, 1]
    b = init.offset.unsqueeze(-1) * beta if spec.offset else None
    stored: dict[str, torch.Tensor] = {}
    if not _is_k(qtype):
        S = _F16.apply(s)
        B = _F16.apply(b) if b is not None else None
        stored["d"] = S.reshape(-1)
        if B is not None:
            stored["m"] = B.reshape(-1)
    else:
        nsub = gq.QK_K // gs
        supers = groups // nsub
        sb = s.reshape(rows, supers, nsub)
        d = _super_scale(sb, init.scale.reshape(rows, supers, nsub), init.d)
        sc = _to_grid(sb, d, spec.sc_lo, spec.sc_hi)
        S = (d * sc).reshape(rows, groups, 1)
        stored.update(d=d.reshape(-1), sc=sc.reshape(-1, nsub))
        B = None
        if spec.offset:
            mb = (-b).reshape(rows, supers, nsub)  # the mins M = -B >= 0
            dmin = _super_scale(mb, (-init.offset).reshape(rows, supers, nsub), init.dmin)
            m = _to_grid(mb, dmin, 0, spec.m_hi)
            B = -(dmin * m).reshape(rows, groups, 1)
            stored.update(dmin=dmin.reshape(-1), m=m.reshape(-1, nsub))
    if not isinstance(v, float):
        v = v.reshape(rows, groups, gs)
    nz = S != 0
    target = xs - B if B is not None else xs
    q = torch.clamp(_Round.apply(target / _safe(S) + v), spec.lo, spec.hi)
    q = torch.where(nz, q, torch.zeros_like(q))
    value = S * q + B if B is not None else S * q
    value = value.reshape(rows, cols)
    if not parts:
        return value
    stored["q"] = (q + spec.zp).reshape(-1, t.block_size)
    return value, stored


def _pack(qtype: str, p: dict[str, torch.Tensor]) -> torch.Tensor:
    q = p["q"]
    if qtype == "q4_0":
        return gq.pack_q4_0(p["d"], q)
    if qtype == "q5_0":
        return gq.pack_q5_0(p["d"], q)
    if qtype == "q8_0":
        return gq.pack_q8_0(p["d"], q)
    if qtype == "q4_1":
        return gq.pack_q4_1(p["d"], p["m"], q)
    if qtype == "q5_1":
        return gq.pack_q5_1(p["d"], p["m"], q)
    if qtype == "q2_k":
        return gq.pack_q2_k(p["d"], p["dmin"], p["sc"], p["m"], q)
    if qtype == "q3_k":
        return gq.pack_q3_k(p["d"], p["sc"] + 32, q)
    if qtype == "q4_k":
        return gq.pack_q4_k(p["d"], p["dmin"], p["sc"], p["m"], q)
    if qtype == "q5_k":
        return gq.pack_q5_k(p["d"], p["dmin"], p["sc"], p["m"], q)
    if qtype == "q6_k":
        return gq.pack_q6_k(p["d"], p["sc"], q)
    raise ValueError(f"SignRound cannot tune ggml type {qtype!r}")


@torch.no_grad()
def encode(
    w: torch.Tensor,
    init: GGUFInit,
    v: torch.Tensor | float = 0.0,
    alpha: torch.Tensor | float = 1.0,
    beta: torch.Tensor | float = 1.0,
) -> gq.GGUFWeight:
    """The GGUF blocks of the tuned parameters (computed on the CPU).  Their decoded weight equals
    ``fake_quantize`` of the same parameters bit for bit; a mismatch raises (it would be a bug here)."""
    cpu = lambda x: x.detach().to("cpu", torch.float32) if isinstance(x, torch.Tensor) else x  # noqa: E731
    w32 = cpu(w)
    value, stored = fake_quantize(w32, init.to("cpu"), cpu(v), cpu(alpha), cpu(beta), parts=True)
    rows, cols = w.shape
    data = _pack(init.qtype, stored).reshape(rows, -1)
    out = gq.GGUFWeight(data, init.qtype, (rows, cols))
    decoded = out.dequantize()
    if not torch.equal(decoded, value):
        bad = (decoded != value).sum().item()
        raise RuntimeError(
            f"internal error: {init.qtype} blocks decode to other weights than the tuned ones ({bad} of "
            f"{value.numel()} values differ)"
        )
    return out
