"""The data-type registry: a weight family registered from outside the package (here a toy one, defined in
this test) is validated, planned, quantized by RTN and tuned by SignRound through the registry alone, and
written by the ``fake`` format; formats that cannot hold it refuse it before any work."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from autoround.quantizer import dtypes
from autoround.quantizer.errors import AutoRoundError, SchemeError
from autoround.quantizer.schemes import PRESETS, QuantScheme

from arhelpers import tiny_llama


@dataclass
class ToyWeight:
    """Symmetric codes with one power-of-two scale per row: the packed weight of the toy family."""

    codes: torch.Tensor  # int8 [out, in]
    exponent: torch.Tensor  # int8 [out, 1]
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(torch.float32) * torch.exp2(self.exponent.to(torch.float32))


def _toy_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    amax = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.ceil(torch.log2(amax / qmax))


def _toy_quantize(weight: torch.Tensor, bits: int, v: torch.Tensor | None = None) -> ToyWeight:
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32)
    exponent = _toy_scale(w, bits)
    x = w / torch.exp2(exponent)
    if v is not None:
        x = x + v
    codes = torch.clamp(torch.round(x), -qmax, qmax)
    return ToyWeight(codes.to(torch.int8), exponent.to(torch.int8), bits)


class ToyTuned(nn.Module):
    """Tunable rounding offsets on the toy codes (straight-through rounding); no min/max factors."""

    factor_range = (0.0, 1.0)
    default_factor_lr_scale = 1.0

    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__()
        self.linear, self.bits = linear, bits
        self.v = nn.Parameter(torch.zeros_like(linear.weight, dtype=torch.float32))
        self.steps = 0

    def factors(self) -> list[nn.Parameter]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        qmax = 2 ** (self.bits - 1) - 1
        w = self.linear.weight.to(torch.float32)
        scale = torch.exp2(_toy_scale(w.detach(), self.bits))
        y = w / scale + self.v
        q = torch.clamp(y + (torch.round(y) - y).detach(), -qmax, qmax)
        return nn.functional.linear(x, (q * scale).to(x.dtype), self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)

    def state(self) -> dict[str, torch.Tensor]:
        return {"v": self.v.detach().clone()}

    def load(self, state) -> None:
        with torch.no_grad():
            self.v.copy_(state["v"])

    def quantized(self) -> ToyWeight:
        return _toy_quantize(self.linear.weight, self.bits, self.v.detach())


class ToyFamily(dtypes.WeightFamily):
    name = "toy"
    weight_type = ToyWeight
    tuners: list[ToyTuned] = []

    def data_types(self) -> tuple[str, ...]:
        return ("toy_pow2",)

    def validate(self, scheme: QuantScheme) -> None:
        if scheme.bits not in (3, 4, 5):
            raise SchemeError(f"toy_pow2 takes 3, 4 or 5 bits, got {scheme.bits}")

    def presets(self) -> dict[str, QuantScheme]:
        return {"TOY4": QuantScheme(bits=4, group_size=-1, sym=True, data_type="toy_pow2")}

    def quantize(self, weight, scheme, importance, search_lowest=0.7, rtn_rounding="computed") -> ToyWeight:
        return _toy_quantize(weight, scheme.bits)

    def tuner(self, linear, scheme, options, importance) -> ToyTuned:
        tuned = ToyTuned(linear, scheme.bits)
        self.tuners.append(tuned)
        return tuned


@pytest.fixture
def toy_family():
    family = dtypes.register_family(ToyFamily())
    ToyFamily.tuners = []
    try:
        yield family
    finally:
        dtypes.unregister_family("toy")
    assert dtypes.family_for("toy_pow2") is None and "TOY4" not in PRESETS


def _calib():
    return [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_registered_family_is_found_and_validated(toy_family):
    assert dtypes.family_for("toy_pow2") is toy_family
    assert "toy_pow2" in dtypes.data_types()
    assert PRESETS["TOY4"].data_type == "toy_pow2"  # its presets join the scheme presets
    with pytest.raises(SchemeError, match="toy_pow2 takes 3, 4 or 5 bits"):
        QuantScheme(bits=2, group_size=-1, data_type="toy_pow2")
    with pytest.raises(ValueError, match="already belongs to weight family 'toy'"):
        dtypes.register_family(type("Other", (ToyFamily,), {"name": "other"})())


def test_unknown_data_type_lists_the_registered_ones():
    with pytest.raises(SchemeError, match="data_type='toy_pow2' is not supported; valid: .*int"):
        QuantScheme(bits=4, group_size=-1, data_type="toy_pow2")


@pytest.mark.parametrize("iters", [0, 3])
def test_toy_family_quantizes_and_exports_fake(toy_family, tmp_path, iters):
    """RTN (iters 0) and SignRound (iters 3) run the toy family through the registry; the fake checkpoint
    holds exactly the dequantized toy codes: powers of two times integers within the 4-bit range."""
    from autoround import AutoRound

    model = tiny_llama(hidden=64, inter=128, layers=2, vocab=256)
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ar = AutoRound(model, scheme="TOY4", iters=iters, dataset=_calib(), nsamples=8, seqlen=32, batch_size=4,
                   disable_opt_rtn=True)
    _, folders = ar.quantize_and_save(str(tmp_path / "out"), format="fake")
    tensors = _weights(tmp_path / "out")
    w = tensors["model.layers.0.mlp.down_proj.weight"].to(torch.float32)
    exponent = _toy_scale(w0, 4)
    codes = w / torch.exp2(exponent)
    assert torch.equal(codes, torch.round(codes)) and codes.abs().max() <= 7
    rtn = _toy_quantize(w0, 4).dequantize()
    if iters == 0:
        assert torch.equal(w, rtn)
        assert ToyFamily.tuners == []
    else:  # every quantized linear of both blocks was tuned by the toy tuner, which ran its steps
        assert len(ToyFamily.tuners) == 2 * 7 and all(t.steps >= iters for t in ToyFamily.tuners)
        assert (w - rtn).abs().max() <= torch.exp2(exponent).max() + 1e-6  # at most one code step away
    assert "model.embed_tokens.weight" in tensors  # float tensors are written as float


def test_formats_that_cannot_hold_the_family_refuse_it_before_work(toy_family, tmp_path):
    from autoround import AutoRound

    model = tiny_llama(hidden=64, inter=128, layers=2, vocab=256)
    ar = AutoRound(model, scheme="TOY4", iters=0, dataset=_calib(), nsamples=8, seqlen=32)
    with pytest.raises(AutoRoundError, match="auto_round"):
        ar.quantize_and_save(str(tmp_path / "out"), format="auto_round")
    assert not (tmp_path / "out").exists()


def test_resume_store_keeps_the_family_packed_weight(toy_family, tmp_path):
    """A finished block of the toy family survives the resume store unchanged, through the family alone."""
    import logging

    from autoround.quantizer.resume import ResumeStore

    qw = _toy_quantize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), 4)
    store = ResumeStore.open(tmp_path / "state", {"k": 1}, resume=False, log=logging.getLogger("t"))
    store.save_block("model.layers.0", {"mlp.down_proj": qw}, (1.0, 0.5))
    again = ResumeStore.open(tmp_path / "state", {"k": 1}, resume=True, log=logging.getLogger("t"))
    weights, losses, _ = again.load_block("model.layers.0")
    back = weights["mlp.down_proj"]
    assert isinstance(back, ToyWeight) and back.bits == 4 and losses == (1.0, 0.5)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.exponent, qw.exponent)
    dtypes.unregister_family("toy")
    try:
        with pytest.raises(AutoRoundError, match="weight family 'toy', which is not registered"):
            again.load_block("model.layers.0")
    finally:
        dtypes.register_family(toy_family)
