import torch

from autoround.quantizer.qmath import quantize_weight
from autoround.quantizer.rtn import optimized_rtn_quantize, range_grid, search_grid


def weighted_err(w, wq, imp):
    return ((w - wq) ** 2 * imp).sum().item()


def test_optimized_rtn_beats_plain_rtn_on_weighted_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.linspace(0.2, 2, 256)
    w[:, ::37] *= 6  # outliers make clipping worthwhile
    imp = torch.rand(256, generator=g) ** 4 * 10
    for bits, sym in ((4, True), (3, True), (2, True), (4, False)):
        plain = quantize_weight(w, bits, 64, sym).dequantize()
        opt = optimized_rtn_quantize(w, bits, 64, sym, imp).dequantize()
        assert weighted_err(w, opt, imp) < weighted_err(w, plain, imp)


def test_grid_contains_plain_rtn():
    grid = search_grid(0.7)
    assert grid[-1] == 1.0 and grid[0] == 0.7
    # so optimized RTN can never be worse than RTN on the weighted objective
    w = torch.randn(8, 64)
    imp = torch.ones(64)
    plain = quantize_weight(w, 4, 32, True).dequantize()
    opt = optimized_rtn_quantize(w, 4, 32, True, imp).dequantize()
    assert weighted_err(w, opt, imp) <= weighted_err(w, plain, imp) + 1e-9


def test_symmetric_search_refits_scale_by_least_squares():
    # one dominant weight per group: plain RTN wastes the range on it, the refit scale does not
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g) * 0.1
    w[:, 0] = 1.0
    imp = torch.ones(64)
    plain = quantize_weight(w, 3, 64, True)
    opt = optimized_rtn_quantize(w, 3, 64, True, imp)
    assert weighted_err(w, opt.dequantize(), imp) < 0.8 * weighted_err(w, plain.dequantize(), imp)
    assert torch.equal(opt.scale, opt.scale.half().float())  # stored precision
    assert (range_grid(4) == 8).any()  # plain RTN's range is always a candidate



def test_searched_range_gives_the_searched_parameters_through_plain_minmax():
    """The range that optimized RTN and SignRound's searched start quantize with reproduces the search's own
    parameters exactly: symmetric, the least-squares scale of either sign (fp16-rounded as stored) and the
    integers rounded against it; asymmetric, the searched clip ratio applied to min and max."""
    from autoround.quantizer.qmath import _fp16_round, group_minmax, to_groups
    from autoround.quantizer.rtn import (
        _asym_clip_search, _importance_groups, _sym_scale_search, searched_range,
    )

    g = torch.Generator().manual_seed(3)
    for sym in (True, False):
        for bits in (2, 3, 4):
            w = torch.randn(48, 200, generator=g)  # ragged last group at group 64
            imp = torch.rand(200, generator=g)
            wg = to_groups(w, 64)
            imp_g = _importance_groups(imp, (48, 200), 64)
            got = quantize_weight(w, bits, 64, sym, minmax=searched_range(wg, bits, sym, imp, (48, 200), 64))
            if sym:
                scale = _fp16_round(_sym_scale_search(wg, imp_g, bits, range_grid(bits)))
                assert (scale > 0).any() and (scale < 0).any()
                maxq = 2 ** (bits - 1)
                q = torch.clamp(torch.round(wg / scale), -maxq, maxq - 1) + maxq
                assert torch.equal(got.scale, scale.squeeze(-1))
                assert torch.equal(got.qweight.float(), q.reshape(48, -1)[:, :200])
            else:
                ratio = _asym_clip_search(wg, imp_g, bits, search_grid())
                want = quantize_weight(w, bits, 64, sym, alpha=ratio, beta=ratio)
                assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scale, want.scale)
                assert torch.equal(got.zero, want.zero)
            assert torch.equal(got.qweight, optimized_rtn_quantize(w, bits, 64, sym, imp).qweight)
            plain = quantize_weight(w, bits, 64, sym, minmax=group_minmax(wg))
            assert not torch.equal(plain.qweight, got.qweight)  # the search moved the range
