"""The pure SignRound tuner on a real transformers block (a tiny Llama MLP and a full decoder layer)."""

import copy

import pytest
import torch

from autoround.quantizer.qmath import quantize_weight
from autoround.quantizer.schemes import QuantScheme
from autoround.quantizer.signround import SignRoundOptions, tune_block

from arhelpers import tiny_llama


def block_mse(block, weights, x, y):
    b = copy.deepcopy(block)
    with torch.no_grad():
        for name, qw in weights.items():
            b.get_submodule(name).weight.copy_(qw.dequantize())
        return torch.nn.functional.mse_loss(b(x), y).item()


def mlp_case():
    """A tiny Llama's first MLP, 16 x 8 random inputs, its float outputs and its linear layers' names."""
    mlp = tiny_llama().model.layers[0].mlp
    x = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = mlp(x)
    return mlp, x, y, ["gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("scheme", [QuantScheme(bits=2, group_size=32), QuantScheme(bits=4, group_size=32, sym=False)])
def test_tuned_block_beats_rtn(scheme):
    mlp, x, y, names = mlp_case()
    before = {n: mlp.get_submodule(n).weight.clone() for n in names}
    rtn = {n: quantize_weight(mlp.get_submodule(n).weight, scheme.bits, scheme.group_size, scheme.sym) for n in names}
    result = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=60, batch_size=8))
    assert block_mse(mlp, result.weights, x, y) < 0.9 * block_mse(mlp, rtn, x, y)
    assert result.loss_best <= result.loss_before
    for n in names:  # the block itself is left as it was
        assert torch.equal(mlp.get_submodule(n).weight, before[n])
        assert type(mlp.get_submodule(n)) is torch.nn.Linear


def test_decoder_layer_with_keyword_arguments():
    model = tiny_llama()
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, 64, generator=g)
    pos = model.model.rotary_emb(x, torch.arange(12).unsqueeze(0))

    def forward(block, h):
        out = block(h, position_embeddings=pos, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        y = forward(layer, x)
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    scheme = QuantScheme(bits=2, group_size=32)
    rtn = {n: quantize_weight(layer.get_submodule(n).weight, 2, 32, True) for n in names}
    result = tune_block(layer, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=40, batch_size=4),
                        forward=forward)

    def mse(weights):
        b = copy.deepcopy(layer)
        with torch.no_grad():
            for n, qw in weights.items():
                b.get_submodule(n).weight.copy_(qw.dequantize())
            return torch.nn.functional.mse_loss(forward(b, x), y).item()

    assert mse(result.weights) < mse(rtn)


def test_amp_tunes_under_bf16_autocast():
    """amp=True runs the block under bf16 autocast (the matmuls see bf16 inputs) and still tunes: the result
    beats RTN on the fp32 block, and differs from the fp32 run."""
    mlp, x, y, names = mlp_case()
    scheme = QuantScheme(bits=2, group_size=32)
    rtn = {n: quantize_weight(mlp.get_submodule(n).weight, 2, 32, True) for n in names}
    seen = []
    hook = mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        result = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=60, batch_size=8, amp=True))
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # the tuned forward ran in bf16
    assert block_mse(mlp, result.weights, x, y) < 0.9 * block_mse(mlp, rtn, x, y)
    plain = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=60, batch_size=8, amp=False))
    assert any(not torch.equal(result.weights[n].qweight, plain.weights[n].qweight) for n in names)  # amp changes the steps


def test_options_validate():
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        SignRoundOptions(iters=0)
    with pytest.raises(ValueError, match="init_range must be one of minmax, search, auto"):
        SignRoundOptions(iters=5, init_range="opt")
    assert SignRoundOptions(iters=50).learning_rate == 0.02


def test_autoround_signround_end_to_end(tmp_path):
    """iters > 0 tunes block by block; the model ends closer to the float model than RTN's, and reloads exactly."""
    from transformers import AutoModelForCausalLM

    from autoround import AutoRound

    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    ids = torch.stack(calib[:4])
    with torch.no_grad():
        ref = tiny_llama()(ids).logits

    def dist(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(ids).logits, ref).item()

    rtn = AutoRound(tiny_llama(), scheme="W2A16G32", iters=0, disable_opt_rtn=True)
    rtn.quantize()
    ar = AutoRound(tiny_llama(), scheme="W2A16G32", iters=40, dataset=calib, nsamples=16, seqlen=32, batch_size=4)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "sr"))
    assert dist(ar.model) < dist(rtn.model)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ar.model(ids).logits, atol=1e-4)


def test_amp_holds_tuned_blocks_in_bf16_and_restores_exact_float32(monkeypatch):
    """With amp (the default) a tuned block's weights are held in bf16 while later blocks are tuned, and every
    quantized linear ends in float32 holding exactly its dequantized integers."""
    from autoround import AutoRound
    from autoround.quantizer import block_runner

    # amp runs here even on a CPU whose bf16 matmuls are slow (where it is refused by default: see
    # test_cpu_amp_is_refused_where_bf16_matmuls_are_slow); the tiny model keeps that cheap
    monkeypatch.setattr(block_runner, "CPU_BF16_SLOWDOWN_LIMIT", float("inf"))

    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    model = tiny_llama()
    seen = []
    first, second = model.model.layers[0], model.model.layers[1]
    hook = second.register_forward_pre_hook(lambda m, a: seen.append(first.mlp.down_proj.weight.dtype))
    try:
        ar = AutoRound(model, scheme="W4A16", group_size=32, iters=2, dataset=calib, nsamples=8, seqlen=32, batch_size=4)
        assert ar.tuning_options.amp is True
        ar.quantize()
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # block 0 was held in bf16 while block 1 ran
    for name, layer in ar.layers.items():
        weight = ar.model.get_submodule(name).weight
        assert weight.dtype == torch.float32, name
        assert torch.equal(weight, layer.weight.dequantize()), name


def test_a_failing_torch_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    """enable_torch_compile whose compiler fails (here a backend that raises) warns once and tunes eagerly."""
    from autoround import AutoRound

    real_compile = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=broken_backend))
    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    ar = AutoRound(tiny_llama(), scheme="W4A16", group_size=32, iters=2, dataset=calib, nsamples=8, seqlen=32, batch_size=4,
                   enable_torch_compile=True)
    with caplog.at_level("WARNING", logger="autoround"):
        ar.quantize()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler in this test" in warnings[0]
    assert len(ar.layers) == 14


def test_searched_init_range_starts_from_optimized_rtn_and_auto_picks_it_below_4_bits():
    """init_range="search" starts the min/max factors from optimized RTN's range, weighted by the block's own
    input activations: with a vanishing learning rate the result is optimized RTN with that importance, and its
    loss beats the plain min/max start at 2 bits.  "auto" searches at 2 and 3 bits and keeps min/max at 4."""
    from autoround.quantizer.rtn import optimized_rtn_quantize
    from autoround.quantizer.importance import block_importance as input_importance

    mlp, x, y, names = mlp_case()
    imp = input_importance(mlp, names, x, lambda b, h: b(h), 8)
    for bits in (2, 3, 4):
        scheme = QuantScheme(bits=bits, group_size=32)
        layers = dict.fromkeys(names, scheme)
        frozen = dict(iters=1, lr=1e-9, batch_size=8)
        searched = tune_block(mlp, layers, x, y, SignRoundOptions(init_range="search", **frozen))
        for n in names:
            want = optimized_rtn_quantize(mlp.get_submodule(n).weight, bits, 32, True, imp[n])
            assert torch.equal(searched.weights[n].qweight, want.qweight), (bits, n)
            assert torch.equal(searched.weights[n].scale, want.scale), (bits, n)
        plain = tune_block(mlp, layers, x, y, SignRoundOptions(init_range="minmax", **frozen))
        auto = tune_block(mlp, layers, x, y, SignRoundOptions(init_range="auto", **frozen))
        expected = searched if bits <= 3 else plain
        assert all(torch.equal(auto.weights[n].qweight, expected.weights[n].qweight) for n in names)
        if bits == 2:
            assert block_mse(mlp, searched.weights, x, y) < block_mse(mlp, plain.weights, x, y)


def test_outlier_filtered_loss_leaves_out_the_largest_errors():
    from autoround.quantizer.signround import OUTLIER_SHARE, masked_mse

    target = torch.zeros(2, 50, 20)
    out = torch.full_like(target, 0.1)
    out[1, 7, 3] = 100.0  # one outlier among 2000 elements: 0.1% of them is 2, at least 1
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[0, -1] = False
    counted = int(mask.sum()) * 20
    k = max(1, int(counted * OUTLIER_SHARE))
    filtered = masked_mse(out, target, mask, drop_outliers=True)
    assert filtered.item() == pytest.approx(0.01)  # the outlier (and one ordinary element) are gone
    assert masked_mse(out, target, mask).item() == pytest.approx((0.01 * (counted - 1) + 1e4) / counted)
    assert masked_mse(out, target, None, drop_outliers=True).item() == pytest.approx(0.01)
    assert k == 1


def test_alg_ext_searches_at_every_width_widens_the_factors_and_filters_below_4_bits(monkeypatch):
    """enable_alg_ext: a 4-bit layer starts from the searched range as 2- and 3-bit layers do, its min/max
    factors may grow past 1 (up to 2), and the outlier-filtered loss is used exactly when a layer is below 4 bits."""
    from autoround.quantizer import signround
    from autoround.quantizer.dtypes import family_of

    mlp, x, y, names = mlp_case()
    w4 = QuantScheme(bits=4, group_size=32)
    on, off = SignRoundOptions(iters=3, enable_alg_ext=True), SignRoundOptions(iters=3)
    fam = family_of(w4)
    assert fam.tuning_importance(w4, on) and not fam.tuning_importance(w4, off)
    imp = {n: torch.ones(mlp.get_submodule(n).in_features) for n in names}
    for options, high in ((on, 2.0), (off, 1.0)):
        t = fam.tuner(mlp.gate_proj, w4, options, imp["gate_proj"])
        with torch.no_grad():
            t.alpha.fill_(1.7)
            t.beta.fill_(2.5)
        t.clamp_()
        assert torch.all(t.alpha == min(1.7, high)) and torch.all(t.beta == high)

    seen = []
    real = signround.masked_mse
    monkeypatch.setattr(signround, "masked_mse", lambda *a: seen.append(a[3] if len(a) > 3 else False) or real(*a))
    for bits, options, want in ((4, on, False), (3, on, True), (2, off, False)):
        seen.clear()
        tune_block(mlp, dict.fromkeys(names, QuantScheme(bits=bits, group_size=32)), x, y, options)
        assert seen and set(seen) == {want}, (bits, options.enable_alg_ext)


def test_alg_ext_end_to_end_changes_the_result_and_beats_rtn():
    mlp, x, y, names = mlp_case()
    scheme = QuantScheme(bits=2, group_size=32)
    rtn = {n: quantize_weight(mlp.get_submodule(n).weight, 2, 32, True) for n in names}
    base = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=40, batch_size=8))
    ext = tune_block(mlp, dict.fromkeys(names, scheme), x, y,
                     SignRoundOptions(iters=40, batch_size=8, enable_alg_ext=True))
    assert any(not torch.equal(ext.weights[n].qweight, base.weights[n].qweight) for n in names)
    assert block_mse(mlp, ext.weights, x, y) < block_mse(mlp, rtn, x, y)
