"""Hadamard rotation (``rotation_config``): each quantized linear layer sees its input rotated by a
block-diagonal orthogonal matrix, and its weight is rotated the same way offline, so the float layer computes
exactly what it did:

    y = x Wᵀ = (x Tᵀ)(W Tᵀ)ᵀ        T = diag(R, R, ...), R an orthonormal [block_size, block_size] Hadamard

The rotation spreads outliers over each block of ``block_size`` input features, which is what a shared
per-group scale (MXFP4's E8M0 per 32, NVFP4's per 16, integer groups) needs.

Layout, as the reference (Intel auto-round 0.16.1) writes it: every linear layer except the output embedding
carries its own input rotation; the stored weight is the rotated one; the checkpoint's ``quantization_config``
records ``rotation_config`` (``hadamard_type``, ``block_size``); with ``random_hadamard`` every rotated layer
also stores its matrix R as the tensor ``hadamard_matrix``.  A loader applies ``x -> x Rᵀ`` per block before
the layer (our transformers loader does, as does the reference's).  Nothing is folded into neighbouring layers:
the ``fake`` format writes each dequantized weight rotated back (``W = W_rot T``), an ordinary float checkpoint.

``R``: ``hadamard`` is the Sylvester matrix for powers of two and a Paley construction (times Sylvester
doublings) for other orders; ``random_hadamard`` is that matrix with its columns' signs flipped at random
from ``seed`` (the reference takes no seed; here it is honoured, default 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import Transform
from ..errors import AutoRoundError
from ...log import logger

HADAMARD_TYPES = ("hadamard", "random_hadamard")
DEFAULT_BLOCK_SIZE = 32
_ROTATION_ATTR = "_autoround_input_rotation"
# keys of the reference's RotationConfig that this rotation reads (written back to checkpoints as it does)
_KNOWN_KEYS = {"algorithm", "backend", "block_size", "hadamard_type", "seed", "random_seed", "layerwise",
               "fuse_online_to_weight", "allow_online_rotation", "mode"}


@dataclass(frozen=True)
class RotationSpec:
    """A validated ``rotation_config``."""

    hadamard_type: str = "hadamard"
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: int = 0
    # "online": each layer's input is rotated when it runs (the reference's transform layout); "residual": the
    # residual stream is rotated and every rotation folded into the weights (an ordinary checkpoint)
    mode: str = "online"
    # residual mode: down_proj's input (after the gate's nonlinearity, which no fold crosses) is rotated online too,
    # as the reference's ``inplace`` backend does with ``allow_online_rotation`` left True (QuaRot's online step)
    online_down: bool = False

    def __post_init__(self) -> None:
        if self.hadamard_type not in HADAMARD_TYPES:
            raise AutoRoundError(
                f"rotation_config hadamard_type={self.hadamard_type!r} is not built; choose one of "
                f"{', '.join(HADAMARD_TYPES)} (per-layer online input rotation)"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise AutoRoundError(f"rotation_config block_size={self.block_size!r} must be an integer >= 2")
        hadamard_order_error(self.block_size, raise_=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise AutoRoundError(f"rotation_config seed={self.seed!r} must be an integer")
        if self.mode not in ("online", "residual"):
            raise AutoRoundError(f"rotation_config mode={self.mode!r}: choose 'online' or 'residual'")
        if self.online_down and self.mode != "residual":
            raise AutoRoundError("rotation_config: the online down_proj rotation goes with the residual-stream "
                                 "rotation (backend 'inplace'); the per-layer online rotation already rotates it")

    @classmethod
    def parse(cls, value: Any) -> "RotationSpec | None":
        """``None``/``False``/""/{} (no rotation), ``"default"`` / a hadamard type name, or a dict with
        ``hadamard_type``, ``block_size`` and ``seed`` (the reference's other RotationConfig keys are accepted
        where they mean what this rotation does)."""
        if value is None or value is False or value == "" or value == {}:
            return None
        if isinstance(value, RotationSpec):
            return value
        if isinstance(value, str):
            name = value.strip().lower()
            if name in ("default", "hadamard"):
                return cls()
            if name == "random_hadamard":
                return cls(hadamard_type=name)
            raise AutoRoundError(
                f"rotation_config={value!r} is not known; use 'default' (block-{DEFAULT_BLOCK_SIZE} Hadamard), "
                "'random_hadamard', or a dict such as {'hadamard_type': 'random_hadamard', 'block_size': 32, "
                "'seed': 0}, or {'backend': 'inplace'} (QuaRot's residual-stream rotation; SpinQuant's learned "
                "rotations are not built)"
            )
        if not isinstance(value, Mapping):
            raise AutoRoundError(f"rotation_config must be a string or a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - _KNOWN_KEYS)
        if unknown:
            raise AutoRoundError(
                f"rotation_config keys {unknown} are not known; known: hadamard_type, block_size, seed"
            )
        algorithm = value.get("algorithm", "hadamard")
        if algorithm != "hadamard":
            raise AutoRoundError(
                f"rotation_config algorithm={algorithm!r} is not built; only 'hadamard' (per-layer input rotation)"
            )
        backend = value.get("backend", "auto")
        if backend not in ("auto", "transform", "inplace"):
            raise AutoRoundError(
                f"rotation_config backend={backend!r}: choose 'auto' / 'transform' (per-layer online rotation) or "
                "'inplace' (the residual stream rotated, folded into the weights)"
            )
        kind = str(value.get("hadamard_type", "hadamard")).lower()
        mode = value.get("mode", "residual" if backend == "inplace" or kind.startswith("inplace_") else "online")
        kind = {"inplace_hadamard": "hadamard", "inplace_random": "random_hadamard"}.get(kind, kind)
        if value.get("fuse_online_to_weight"):
            raise AutoRoundError("rotation_config fuse_online_to_weight is not built; leave it unset")
        if value.get("allow_online_rotation") is False and mode != "residual":
            raise AutoRoundError(
                "rotation_config allow_online_rotation=False: this rotation is applied online by the loader; "
                "leave it unset, or use backend 'inplace' (the residual-stream rotation, folded into the weights)"
            )
        if value.get("layerwise"):
            raise AutoRoundError("rotation_config layerwise=True is not built; leave it unset")
        seed = value.get("seed", value.get("random_seed"))
        block = value.get("block_size")
        return cls(
            hadamard_type=kind,
            block_size=DEFAULT_BLOCK_SIZE if block is None else block,
            seed=0 if seed is None else seed,
            mode=mode,
            online_down=mode == "residual" and value.get("allow_online_rotation", True) is not False,
        )

    def record(self) -> dict[str, Any]:
        """What a checkpoint's ``quantization_config["rotation_config"]`` holds (the reference's keys)."""
        out: dict[str, Any] = {
            "algorithm": "hadamard", "backend": "auto", "block_size": self.block_size,
            "hadamard_type": self.hadamard_type, "layerwise": False, "fuse_online_to_weight": None,
            "allow_online_rotation": True,
        }
        if self.hadamard_type == "random_hadamard":
            out["seed"] = self.seed
        return out

    def matrix(self) -> torch.Tensor:
        """R: the orthonormal ``[block_size, block_size]`` block, float64."""
        h = hadamard(self.block_size).to(torch.float64) / self.block_size ** 0.5
        if self.hadamard_type == "random_hadamard":
            gen = torch.Generator().manual_seed(self.seed)
            signs = torch.randint(0, 2, (self.block_size,), generator=gen).to(torch.float64) * 2 - 1
            h = h * signs  # column signs: still orthonormal
        return h


# -- Hadamard matrices ---------------------------------------------------------------------------------------


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's constructions over a prime field, or None."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I
        s = torch.zeros(n, n, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.int64)
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II
            c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            zero = torch.tensor([[1, -1], [-1, -1]])
            one = torch.tensor([[1, 1], [1, -1]])
            return torch.where(c[:, None, :, None] == 0, zero[None, :, None, :],
                               c[:, None, :, None] * one[None, :, None, :]).reshape(n, n)
    return None


def _hadamard_or_none(n: int) -> torch.Tensor | None:
    """Sylvester for powers of two; otherwise a Paley matrix of order n / 2^k grown by k Sylvester doublings."""
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    base, doublings = n, 0
    if n & (n - 1) == 0:
        base, doublings = 1, n.bit_length() - 1
    core = None
    while core is None:
        core = torch.ones(1, 1, dtype=torch.int64) if base == 1 else (_paley(base) if base % 4 == 0 else None)
        if core is None:
            if base % 2:
                return None
            base, doublings = base // 2, doublings + 1
    for _ in range(doublings):
        core = torch.kron(h2, core)
    return core


def hadamard_order_error(n: int, raise_: bool = False) -> str | None:
    """Why no Hadamard matrix of order ``n`` is built here, or None."""
    if _hadamard_or_none(n) is not None:
        return None
    msg = (f"no Hadamard matrix of order {n} is built here: orders are 2^k, (p+1)*2^k for primes p = 3 mod 4 and "
           f"2(p+1)*2^k for primes p = 1 mod 4 (e.g. 12, 20, 24, 28, 32, 36, 40, 48, 64); choose such a block size")
    if raise_:
        raise AutoRoundError(f"rotation_config block_size={n}: {msg}")
    return msg


def hadamard(n: int) -> torch.Tensor:
    """An n x n matrix of ±1 with H Hᵀ = n I (int64)."""
    h = _hadamard_or_none(n)
    if h is None:
        raise AutoRoundError(hadamard_order_error(n))
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64)):
        raise AssertionError(f"internal error: the Hadamard construction of order {n} is not orthogonal")
    return h


# -- applying it ---------------------------------------------------------------------------------------------


def rotate_rows(t: torch.Tensor, r: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``t`` [..., K] with every block of ``len(r)`` last-dim features multiplied by Rᵀ (``inverse``: by R),
    computed in ``r``'s dtype, returned in ``t``'s."""
    bs = r.shape[0]
    blocks = t.reshape(-1, bs).to(r.dtype)  # one 2-D GEMM (a batched matmul of tiny blocks is far slower)
    out = blocks @ (r if inverse else r.T)
    return out.reshape(t.shape).to(t.dtype)


class InputRotation:
    """The online half of a layer's rotation: ``x -> x Rᵀ`` per block (a plain object, so it is not part of the
    module's state dict; the matrix follows the input's device and dtype)."""

    def __init__(self, r: torch.Tensor) -> None:
        self.r = r.to(torch.float64)
        self._cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        r = self._cast.get(key)
        if r is None:
            r = self._cast[key] = self.r.to(x.device, x.dtype)
        return rotate_rows(x, r)


def rotation_of(module: nn.Module) -> InputRotation | None:
    """The input rotation installed on ``module`` (None when it has none)."""
    entry = getattr(module, _ROTATION_ATTR, None)
    return entry[0] if entry is not None else None


def install_input_rotation(module: nn.Module, r: torch.Tensor) -> InputRotation:
    """Rotate ``module``'s input on every call (a forward pre-hook registered before any other, so activation
    quantization and calibration hooks see the rotated input)."""
    remove_input_rotation(module)
    rot = InputRotation(r)
    handle = module.register_forward_pre_hook(lambda _m, args: (rot(args[0]), *args[1:]), prepend=True)
    setattr(module, _ROTATION_ATTR, (rot, handle))
    return rot


def remove_input_rotation(module: nn.Module) -> None:
    entry = getattr(module, _ROTATION_ATTR, None)
    if entry is not None:
        entry[1].remove()
        delattr(module, _ROTATION_ATTR)


class RotatedInput(nn.Module):
    """``inner`` with the input rotation applied first (SignRound's tuned block, whose wrappers replace the
    linear modules and so bypass their hooks)."""

    def __init__(self, inner: nn.Module, rotation: InputRotation) -> None:
        super().__init__()
        self.inner, self.rotation = inner, rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.rotation(x))


class HadamardRotation(Transform):
    """The transform stage's rotation: rotates every target linear's weight and installs its input rotation;
    ``settle`` rotates back the layers the plan keeps in float, so only quantized layers stay rotated."""

    name = "hadamard rotation"

    def __init__(self, spec: RotationSpec) -> None:
        self.spec = spec
        self.rotated: list[str] = []

    def apply(self, model: nn.Module, linears: dict[str, nn.Module], block_names: list[str]) -> dict[str, nn.Module]:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = {n: m for n, m in linears.items() if m is not head and n.rsplit(".", 1)[-1] != "lm_head"}
        bad = [f"{n} ({m.in_features})" for n, m in targets.items() if m.in_features % self.spec.block_size]
        if bad:
            raise AutoRoundError(
                f"rotation_config block_size={self.spec.block_size} does not divide the input features of "
                f"{len(bad)} layer(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; choose a block size "
                "that divides them (or exclude those layers)"
            )
        r = self.spec.matrix()
        with torch.no_grad():
            for name, module in targets.items():
                w = module.weight
                w.copy_(rotate_rows(w.detach(), r.to(w.device)))
                install_input_rotation(module, r)
        self.rotated = list(targets)
        return linears

    def format_error(self, fmt) -> str | None:
        if getattr(fmt, "rotation", False):
            return None
        return (f"format {fmt.name!r} cannot carry the online input rotation of rotation_config (a loader must "
                "rotate each layer's input); write auto_round (our loader and the reference's apply it) or fake "
                "(the rotation is folded back into the dequantized weights)")

    def settle(self, model: nn.Module, quantized: set[str]) -> None:
        """Undo the rotation of the layers that stay in float (their checkpoint weight is the plain one)."""
        _unrotate_float(model, self.rotated, quantized)
        self.rotated = [n for n in self.rotated if n in quantized]


@torch.no_grad()
def _unrotate_float(model: nn.Module, rotated: list[str], quantized: set[str]) -> None:
    """The online-rotated layers of ``rotated`` that are not ``quantized`` get their plain weight back and lose
    their input rotation."""
    for name in rotated:
        if name in quantized:
            continue
        module = model.get_submodule(name)
        rot = rotation_of(module)
        if rot is None:
            continue
        w = module.weight
        w.copy_(rotate_rows(w.detach(), rot.r.to(w.device), inverse=True))
        remove_input_rotation(module)


# -- residual-stream rotation, folded into the weights ------------------------------------------------------------

RESIDUAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ResidualRotation(Transform):
    """``mode="residual"`` (the reference's ``inplace`` backend): the residual stream is rotated, x -> x Tᵀ, and
    every rotation is folded into the weights, so the model stays an ordinary checkpoint that any reader runs.

    - Each RMSNorm's gain is folded into the layers that read it (W <- W diag(g), g <- 1): a unit-gain RMSNorm
      commutes with an orthogonal T.
    - The embedding and the layers that read the residual (q/k/v, gate/up, lm_head) take W <- W Tᵀ; the layers that
      write it (o_proj, down_proj) take W <- T W (and their bias b <- b Tᵀ).
    - V/O: v_proj's output rows and o_proj's input are rotated per head (block_size must divide head_dim), so
      o_proj's input is rotated too with no online step.
    - down_proj's input (after the gate's nonlinearity) cannot be folded. With ``online_down`` (the reference's
      ``allow_online_rotation``, on by default) it is rotated online, per block as the per-layer rotation does
      (W <- W Tᵀ and an input hook), QuaRot's online step; that model is no longer an ordinary checkpoint, so only
      ``fake`` (each down_proj written rotated back) holds it, as only fake holds the reference's.  Without it,
      down_proj's input stays unrotated and every format holds the model.
    - A tied lm_head is untied (its copy takes the final norm's gain).

    Pre-norm RMSNorm decoders with the standard names (``RESIDUAL_MODEL_TYPES``); the float model's logits are
    checked unchanged after folding, and any other model is refused before work."""

    name = "hadamard rotation (residual stream, folded)"

    def __init__(self, spec: RotationSpec) -> None:
        self.spec = spec
        self.rotated: list[str] = []  # the down_proj layers rotated online

    def _structure_error(self, model: nn.Module, block_names: list[str]) -> str | None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in RESIDUAL_MODEL_TYPES:
            return f"model type {mt!r} (built for {', '.join(RESIDUAL_MODEL_TYPES)})"
        body = getattr(model, "model", None)
        need = [(body, "embed_tokens"), (body, "norm"), (model, "lm_head")]
        missing = [n for owner, n in need if getattr(owner, n, None) is None]
        if missing or block_names != ["model.layers"]:
            return f"the model's layout (missing {missing or 'the model.layers block list'})"
        for block in body.layers:
            for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                         "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                try:
                    block.get_submodule(path)
                except AttributeError:
                    return f"a block without {path}"
        hidden = body.embed_tokens.weight.shape[1]
        if hidden % self.spec.block_size:
            return f"block_size {self.spec.block_size} does not divide the hidden size {hidden}"
        inter = body.layers[0].mlp.down_proj.in_features if len(body.layers) else 0
        if self.spec.online_down and inter % self.spec.block_size:
            return (f"block_size {self.spec.block_size} does not divide down_proj's input features {inter} (the online "
                    "down_proj rotation; allow_online_rotation=False leaves it out)")
        return None

    @torch.no_grad()
    def apply(self, model: nn.Module, linears: dict[str, nn.Module], block_names: list[str]) -> dict[str, nn.Module]:
        err = self._structure_error(model, block_names)
        if err:
            raise AutoRoundError(
                f"rotation_config backend 'inplace' (residual-stream rotation) cannot fold into this model: {err}; "
                "use the per-layer online rotation (rotation_config='default') instead"
            )
        body, head = model.model, model.lm_head
        ids = torch.randint(0, body.embed_tokens.weight.shape[0], (1, 16), generator=torch.Generator().manual_seed(0))
        ids = ids.to(body.embed_tokens.weight.device)
        before = model(input_ids=ids).logits.float()
        r = self.spec.matrix()
        head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        fold_vo = head_dim % self.spec.block_size == 0

        def rot_in(lin: nn.Module, gain: torch.Tensor | None = None) -> None:
            w = lin.weight.detach().double()
            if gain is not None:
                w = w * gain.double()[None, :]
            lin.weight.copy_(rotate_rows(w, r).to(lin.weight.dtype))

        def rot_out(lin: nn.Module) -> None:
            lin.weight.copy_(rotate_rows(lin.weight.detach().double().T, r).T.to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_(rotate_rows(lin.bias.detach().double(), r).to(lin.bias.dtype))

        if head.weight is body.embed_tokens.weight or getattr(model.config, "tie_word_embeddings", False):
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        emb = body.embed_tokens.weight
        emb.copy_(rotate_rows(emb.detach().double(), r).to(emb.dtype))
        for block in body.layers:
            attn, mlp = block.self_attn, block.mlp
            g = block.input_layernorm.weight
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                rot_in(lin, g)
            g.fill_(1.0)
            rot_out(attn.o_proj)
            if fold_vo:
                rot_out(attn.v_proj)
                rot_in(attn.o_proj)
            g = block.post_attention_layernorm.weight
            for lin in (mlp.gate_proj, mlp.up_proj):
                rot_in(lin, g)
            g.fill_(1.0)
            rot_out(mlp.down_proj)
            if self.spec.online_down:
                rot_in(mlp.down_proj)
                install_input_rotation(mlp.down_proj, r)
        if self.spec.online_down:
            self.rotated = [n for n, m in linears.items() if isinstance(m, nn.Module) and n.endswith(".mlp.down_proj")
                            and rotation_of(m) is not None]
        rot_in(head, body.norm.weight)
        body.norm.weight.fill_(1.0)
        after = model(input_ids=ids).logits.float()
        tol = 1e-3 if emb.dtype == torch.float32 else 5e-2  # 16-bit weights round the rotated values again
        if not torch.allclose(after, before, atol=tol * float(before.abs().max().clamp_min(1.0)), rtol=tol):
            raise AutoRoundError(
                "rotation_config backend 'inplace': the folded model's logits differ from the float model's "
                f"(max |diff| {float((after - before).abs().max()):.3g}); this model's layout is not the one the "
                "residual rotation assumes; use rotation_config='default'"
            )
        if not fold_vo:
            logger.info("residual rotation: head_dim %d is not a multiple of block_size %d; o_proj's input is not "
                        "rotated", head_dim, self.spec.block_size)
        if self.spec.online_down:
            logger.info("residual rotation folded into the weights; down_proj's input is rotated online (%d layers): "
                        "only the fake format holds this model (allow_online_rotation=False gives an ordinary "
                        "checkpoint without it)", len(self.rotated))
        else:
            logger.info("residual rotation folded into the weights; no online rotation (allow_online_rotation=False)")
        return linears

    def format_error(self, fmt) -> str | None:
        if not self.spec.online_down or getattr(fmt, "folds_rotation", False):
            return None
        return (f"format {fmt.name!r} cannot carry the online down_proj rotation of rotation_config backend 'inplace' "
                "(allow_online_rotation, on by default as in the reference, whose inplace backend exports fake only); "
                "write fake (each down_proj is written rotated back), or set allow_online_rotation=False for an "
                "ordinary checkpoint that every format holds")

    def settle(self, model: nn.Module, quantized: set[str]) -> None:
        """Undo the online down_proj rotation of the layers that stay in float (the residual fold stays)."""
        _unrotate_float(model, self.rotated, quantized)
        self.rotated = [n for n in self.rotated if n in quantized]
