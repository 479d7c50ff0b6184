import torch
import pytest

from autoround.quantizer.qmath import (
    compute_params, dequantize, fake_quantize, group_layout, quantize_weight, round_ste, to_groups,
)


def test_symmetric_full_range_negative_scale():
    # the positive side dominates: it maps to -8, so the scale is negative
    w = torch.tensor([[0.8, -0.2, 0.1, 0.0]])
    qw = quantize_weight(w, bits=4, group_size=-1, sym=True)
    s = qw.scale.item()
    assert s < 0 and abs(s - torch.tensor(-0.8 / 8).half().item()) < 1e-8
    assert qw.zero.item() == 8
    assert qw.qweight[0, 0].item() == 0  # 0.8 / s = -8 -> stored -8 + 8 = 0
    assert torch.allclose(qw.dequantize(), w, atol=abs(s) / 2 + 1e-6)


def test_symmetric_negative_side_positive_scale():
    w = torch.tensor([[-0.8, 0.2, 0.1, 0.0]])
    qw = quantize_weight(w, bits=4, group_size=-1, sym=True)
    assert qw.scale.item() > 0
    assert qw.qweight[0, 0].item() == 0


def test_asymmetric_zero_point():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.75]])
    qw = quantize_weight(w, bits=2, group_size=-1, sym=False)
    assert qw.zero.item() == 0
    assert torch.allclose(qw.scale, torch.tensor([[1.0]]))
    assert qw.qweight.tolist() == [[0, 2, 3, 1]] or qw.qweight.tolist() == [[0, 1, 3, 1]]


def test_scales_are_fp16_exact_and_nonzero():
    w = torch.randn(16, 64)
    w[0] = 0
    qw = quantize_weight(w, 4, 32, True)
    assert torch.equal(qw.scale, qw.scale.half().float())
    assert (qw.scale.abs() >= 1e-5 - 1e-9).all()
    assert (qw.dequantize()[0] == 0).all()


def test_ragged_groups_smollm2_shape():
    # 576 input features with group 128: 5 groups, the last one has 64 channels
    assert group_layout(576, 128) == (128, 5)
    w = torch.randn(8, 576)
    qw = quantize_weight(w, 4, 128, True)
    assert qw.scale.shape == (8, 5) and qw.qweight.shape == (8, 576)
    # the last group's scale depends only on its own 64 channels
    last = quantize_weight(w[:, 512:], 4, -1, True)
    assert torch.equal(qw.scale[:, 4:], last.scale)
    # full range: every value is within half a step, except the side mapped to +7 which may lose one step
    err = (qw.dequantize() - w).abs()
    step = qw.scale.abs().repeat_interleave(128, 1)[:, :576]
    assert (err <= step + 1e-6).all()
    assert ((err <= step / 2 + 1e-6).float().mean() > 0.95)


def test_group_modes():
    w = torch.randn(4, 64)
    per_row = quantize_weight(w, 4, -1, True)
    per_tensor = quantize_weight(w, 4, 0, True)
    assert per_row.scale.shape == (4, 1) and per_tensor.scale.shape == (4, 1)
    assert (per_tensor.scale == per_tensor.scale[0, 0]).all()
    assert to_groups(w, 0).shape == (1, 1, 256)


def test_dequantize_matches_fake_quantize():
    w = torch.randn(32, 96)
    for sym in (True, False):
        for bits in (2, 3, 4, 8):
            qw = quantize_weight(w, bits, 32, sym)
            assert torch.allclose(qw.dequantize(), fake_quantize(w, bits, 32, sym), atol=1e-6)
            assert qw.qweight.max() <= 2**bits - 1


def test_straight_through_gradients():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    w = torch.randn(8, 32)
    v = torch.zeros(8, 32, requires_grad=True)
    alpha = torch.ones(8, 1, 1, requires_grad=True)
    fake_quantize(w, 4, 32, True, v=v, alpha=alpha, beta=alpha).pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert alpha.grad is not None


def test_clipping_shrinks_scale():
    wg = to_groups(torch.randn(4, 32), 32)
    s1, _ = compute_params(wg, 4, True)
    s2, _ = compute_params(wg, 4, True, 0.5, 0.5)
    assert (s2.abs() < s1.abs()).all()


def test_dequantize_function_shapes():
    q = torch.full((2, 6), 8, dtype=torch.uint8)
    out = dequantize(q, torch.ones(2, 2), torch.full((2, 2), 8), 4)
    assert out.shape == (2, 6) and out.abs().sum() == 0


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (2, 32, False), (3, 24, True), (8, -1, False), (4, 0, True)])
def test_fused_fake_quantize_matches_autograd_of_the_composed_ops(bits, group_size, sym):
    """The few-pass custom function (used when v is a tensor) gives the values and the gradients that autograd
    through round_ste/clamp/mul gives; a ragged last group (40 features, group 24) included."""
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    g = torch.randn(16, 40)
    v0 = (torch.rand(16, 40) - 0.5) * 0.9  # offsets that push some weights past the clamp range
    ab = torch.rand(16, 1 if group_size in (-1, 0) else -(-40 // group_size), 1) * 0.5 + 0.5
    if group_size == 0:
        ab = ab[:1, :1]
    results = []
    for fused in (True, False):
        v = v0.clone().requires_grad_(True)
        alpha, beta = ab.clone().requires_grad_(True), (ab.flip(0) if group_size else ab).clone().requires_grad_(True)
        wq = fake_quantize(w.requires_grad_(not fused), bits, group_size, sym, v=v, alpha=alpha, beta=beta)
        (wq * g).sum().backward()
        results.append((wq.detach(), v.grad, alpha.grad, beta.grad))
        w = w.detach()
    (f_wq, f_v, f_a, f_b), (a_wq, a_v, a_a, a_b) = results
    assert torch.equal(f_wq, a_wq)
    assert torch.equal(f_v, a_v)
    assert torch.allclose(f_a, a_a, rtol=1e-4, atol=1e-5) and torch.allclose(f_b, a_b, rtol=1e-4, atol=1e-5)
    assert f_v.abs().sum() > 0 and (f_a.abs().sum() + f_b.abs().sum()) > 0


def test_symmetric_tie_maps_the_max_to_minus_maxq():
    """|min| == |max| (common when the weights already lie on a symmetric grid): the reference tool maps the
    max to -maxq, so the scale is negative and the min is the value that gets clipped to -(maxq-1) * s."""
    w = torch.tensor([[-0.4, 0.1, 0.4, 0.2]])
    qw = quantize_weight(w, 2, 4, True)
    assert qw.scale.item() == pytest.approx(-0.2, rel=1e-3)
    assert qw.dequantize()[0, 2].item() == pytest.approx(0.4, rel=1e-3)  # the max is exact
    assert qw.dequantize()[0, 0].item() == pytest.approx(-0.2, rel=1e-3)  # the min is clipped


def test_plain_rtn_rounds_with_the_computed_scale_signround_with_the_stored_one():
    """A weight exactly half-way between two steps of the float32 scale, but not of the fp16 scale stored.

    Row [2(1 + 2^-12), -(1/2)(1 + 2^-12)], 2-bit symmetric: the positive side maps to -2, so the float32 scale is
    s = -(1 + 2^-12) and the checkpoint stores fp16(s) = -1.0.  The second weight over s is exactly 0.5, which
    rounds half to even to 0 (stored 0 + 2 = 0b10); over the stored -1.0 it is 0.5 + 2^-13, which rounds to 1
    (stored 0b11).  Plain RTN takes the first (the reference's RTN integers, bit for bit); the default takes the
    second, the nearest integer for the scale a checkpoint keeps.  Both store the scale -1.0."""
    from autoround.quantizer.qmath import ROUND_WITH_COMPUTED
    from autoround.quantizer.rtn import rtn_quantize

    w = torch.tensor([[2 * (1 + 2**-12), -0.5 * (1 + 2**-12)]])
    stored = quantize_weight(w, 2, -1, True)
    computed = quantize_weight(w, 2, -1, True, rounding_scale=ROUND_WITH_COMPUTED)
    assert stored.scale.item() == computed.scale.item() == -1.0
    assert stored.qweight.tolist() == [[0b00, 0b11]]
    assert computed.qweight.tolist() == [[0b00, 0b10]]
    assert torch.equal(rtn_quantize(w, 2, -1, True).qweight, computed.qweight)
    # the stored-scale integer is the nearer one for the scale the checkpoint keeps
    err = lambda qw: (qw.dequantize() - w).abs()[0, 1].item()  # noqa: E731
    assert err(stored) < err(computed)
    with pytest.raises(ValueError, match="rounding_scale"):
        quantize_weight(w, 2, -1, True, rounding_scale="fp16")


def test_rounding_scales_agree_away_from_ties():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    from autoround.quantizer.qmath import ROUND_WITH_COMPUTED

    for bits, sym in ((2, True), (4, True), (4, False), (8, True)):
        a = quantize_weight(w, bits, 64, sym)
        b = quantize_weight(w, bits, 64, sym, rounding_scale=ROUND_WITH_COMPUTED)
        assert torch.equal(a.scale, b.scale)  # the stored scale is the same; only near-ties round differently
        assert (a.zero != b.zero).float().mean().item() < 0.02  # an asymmetric zero point is rounded too
        assert (a.qweight != b.qweight).float().mean().item() < 0.01
