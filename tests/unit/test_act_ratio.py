"""SignRound's activation clip ratios (``act_quant.ActQuantizer``): tuned by default for static activation scales
(the checkpoint stores the calibrated amax times the ratio), for dynamic ones under AR_ENABLE_ACT_MINMAX_TUNING
(in memory only; exports refuse them), and the saturating gradient of the float grids they are tuned through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoround import AutoRound
from autoround.quantizer import act_quant
from autoround.quantizer.dtypes.minifloat import E2M1, round_grid_ste
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.options import SignRoundOptions
from autoround.quantizer.schemes import PRESETS, QuantScheme
from autoround.quantizer.signround import tune_block

from arhelpers import tiny_llama

CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
# W8 weights (nearly exact) with 4-bit activations: what the activations' range costs dominates the loss
W8A4_STATIC = QuantScheme(bits=8, group_size=-1, sym=True, act_bits=4, act_group_size=0, act_dynamic=False,
                          act_data_type="int")
W8A4_DYNAMIC = QuantScheme(bits=8, group_size=-1, sym=True, act_bits=4, act_group_size=-1, act_data_type="int")
W8A4_DYNAMIC_ASYM = QuantScheme(bits=8, group_size=-1, sym=True, act_bits=4, act_group_size=-1, act_sym=False,
                                act_data_type="int")


def test_saturated_grid_values_pass_no_gradient():
    x = torch.tensor([0.7, -5.9, 6.5, -9.0], requires_grad=True)
    round_grid_ste(x, E2M1).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # straight through inside ±6, a clamp's zero past it


def _outlier_inputs(n=16, seq=8, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, features, generator=g)
    x[:, :, 0] *= 25  # one outlier channel: the full range wastes most of a 4-bit grid on it
    return x


def _tune(scheme, x, minmax=True, iters=40, amax=None):
    block = nn.Sequential(nn.Linear(64, 32, bias=False))
    torch.manual_seed(0)
    nn.init.normal_(block[0].weight, std=0.1)
    with torch.no_grad():
        targets = block(x)
    opts = SignRoundOptions(iters=iters, batch_size=4, enable_minmax_tuning=minmax, seed=0)
    return tune_block(block, {"0": scheme}, x, targets, opts, input_amax={"0": amax} if amax is not None else None)


def test_static_ratio_is_tuned_and_lowers_the_loss():
    x = _outlier_inputs()
    amax = x.abs().amax()
    tuned = _tune(W8A4_STATIC, x, amax=amax)
    ratio, low = tuned.act_ratios["0"]
    assert 0.0 <= ratio < 0.95 and low == 1.0  # clipping the outlier channel pays at 4 bits
    assert tuned.loss_best < 0.9 * tuned.loss_before
    fixed = _tune(W8A4_STATIC, x, minmax=False, amax=amax)  # no min/max tuning: no ratio either
    assert fixed.act_ratios == {}
    assert tuned.loss_best < fixed.loss_best


def test_dynamic_ratio_only_under_the_variable(monkeypatch):
    x = _outlier_inputs()
    assert _tune(W8A4_DYNAMIC, x, iters=10).act_ratios == {}
    monkeypatch.setenv("AR_ENABLE_ACT_MINMAX_TUNING", "1")
    tuned = _tune(W8A4_DYNAMIC, x)
    assert tuned.act_ratios["0"][0] < 1.0 and tuned.act_ratios["0"][1] == 1.0  # symmetric: no min ratio
    asym = _tune(W8A4_DYNAMIC_ASYM, x)
    assert set(asym.act_ratios) == {"0"}
    quant = act_quant.ActQuantizer(W8A4_DYNAMIC_ASYM, None, tune_max=True, tune_min=True)
    assert len(quant.params()) == 2


def test_ratio_gradient_reaches_through_every_activation_type():
    """A ratio below 1 on each family's dynamic scale changes its output, and the loss reaches the ratio."""
    x = _outlier_inputs(n=1, seq=4).reshape(4, 64)
    for name in ("INT8", "MXFP4", "MXFP8", "NVFP4"):
        s = PRESETS[name]
        amax = x.abs().amax() if act_quant.needs_amax(s) else None
        quant = act_quant.ActQuantizer(s.replace(act_dynamic=True), amax, tune_max=True)
        with torch.no_grad():
            quant.max_ratio.fill_(0.5)
        y = quant(x)
        assert not torch.equal(y, act_quant.act_qdq(x, s, amax)), name
        (y - x).pow(2).sum().backward()
        assert quant.max_ratio.grad is not None and quant.max_ratio.grad.abs() > 0, name


def _fp8_static(**kw):
    # the last iteration's parameters, so that the ratios' moves are kept whatever the loss did
    return AutoRound(tiny_llama(), scheme="FP8_STATIC", iters=4, nsamples=8, seqlen=32, batch_size=4,
                     dataset=CALIB, not_use_best_mse=True, **kw)


def test_fp8_static_exports_the_tuned_input_scale(tmp_path, monkeypatch):
    from safetensors import safe_open

    ar = _fp8_static(lr=0.2)  # large steps: the ratios move within 4 iterations
    _, (out,) = ar.quantize_and_save(str(tmp_path / "q"), format="llm_compressor")
    monkeypatch.setenv("AR_ACT_SCALE", "1")
    plain = _fp8_static(lr=0.2, enable_minmax_tuning=False)
    plain.quantize()
    name = "model.layers.0.mlp.down_proj"
    tuned, calibrated = ar.layers[name].input_amax, plain.layers[name].input_amax
    assert float(tuned) <= float(calibrated) + 1e-6
    moved = [n for n in ar.layers if float(ar.layers[n].input_amax) < 0.999 * float(plain.layers[n].input_amax)]
    assert moved, "no layer's ratio moved"
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        stored = f.get_tensor(f"{moved[0]}.input_scale")
    assert torch.allclose(stored, ar.layers[moved[0]].input_amax.reshape(1) / 448, rtol=1e-6)


def test_act_scale_fixes_the_static_ratio(monkeypatch):
    monkeypatch.setenv("AR_ACT_SCALE", "0.5")
    ar = _fp8_static(lr=0.2)
    ar.quantize()
    monkeypatch.setenv("AR_ACT_SCALE", "1")
    plain = _fp8_static(lr=0.2, enable_minmax_tuning=False)
    plain.quantize()
    for n, layer in ar.layers.items():  # the variable's ratio, not a tuned one (as the reference gives it priority)
        assert torch.allclose(layer.input_amax, plain.layers[n].input_amax * 0.5), n


def test_dynamic_ratios_apply_in_memory_and_refuse_export(tmp_path, monkeypatch):
    monkeypatch.setenv("AR_ENABLE_ACT_MINMAX_TUNING", "1")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    ar = AutoRound(tiny_llama(), scheme="INT8", iters=4, lr=0.2, nsamples=8, seqlen=32, batch_size=4, dataset=CALIB,
                   not_use_best_mse=True)
    model, _ = ar.quantize()
    ratios = {n: layer.act_ratio for n, layer in ar.layers.items()}
    assert all(r is not None for r in ratios.values()) and any(r[0] < 0.999 for r in ratios.values())
    with torch.no_grad():
        tuned_logits = model(ids).logits
        name = next(n for n, r in ratios.items() if r[0] < 0.999)
        act_quant.install(model.get_submodule(name), ar.layers[name].scheme, None)  # the same layer at ratio 1
        assert not torch.equal(tuned_logits, model(ids).logits)
    with pytest.raises(AutoRoundError, match="no checkpoint format can hold"):
        ar.save_quantized(str(tmp_path / "q"), format="llm_compressor")
    assert not (tmp_path / "q").exists()
    ar = AutoRound(tiny_llama(), scheme="INT8", iters=4, nsamples=8, seqlen=32, batch_size=4, dataset=CALIB)
    with pytest.raises(AutoRoundError, match="AR_ENABLE_ACT_MINMAX_TUNING is set, but a dynamic activation scale"):
        ar.quantize_and_save(str(tmp_path / "q2"), format="llm_compressor")
    assert not ar.quantized and not (tmp_path / "q2").exists()


@pytest.mark.parametrize("scheme,kw,why", [
    ("INT8", {"iters": 0}, "iters=0 tunes nothing"),
    ("INT8", {"iters": 2, "enable_minmax_tuning": False}, "enable_minmax_tuning=False"),
    ("FP8_STATIC", {"iters": 2}, "no layer quantizes its activations with dynamic scales"),
    ("W4A16", {"iters": 2}, "no layer quantizes its activations"),
])
def test_minmax_variable_refused_where_it_does_nothing(monkeypatch, scheme, kw, why):
    monkeypatch.setenv("AR_ENABLE_ACT_MINMAX_TUNING", "1")
    ar = AutoRound(tiny_llama(), scheme=scheme, nsamples=8, seqlen=32, batch_size=4, dataset=CALIB, **kw)
    with pytest.raises(AutoRoundError, match=why):
        ar.quantize()
    assert not ar.quantized


def test_static_lm_head_is_calibrated_by_signround_and_refused_by_rtn():
    kw = dict(scheme="FP8_STATIC", nsamples=8, seqlen=32, batch_size=4, dataset=CALIB, quant_lm_head=True)
    ar = AutoRound(tiny_llama(), iters=2, **kw)
    model, _ = ar.quantize()
    head = ar.layers["lm_head"]
    assert head.input_amax is not None and float(head.input_amax) > 0  # its input range, times the tuned ratio
    assert hasattr(model.lm_head, act_quant._HOOK_ATTR)  # the model in memory quantizes the head's inputs
    ar = AutoRound(tiny_llama(), iters=0, **kw)
    with pytest.raises(AutoRoundError, match="only SignRound .iters > 0. measures for the lm_head"):
        ar.quantize()
    assert not ar.quantized

