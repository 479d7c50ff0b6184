"""Every CPU kernel we ship against the torch reference kernel: 2/3/4/8 bits where declared, sym/asym,
ragged last groups, one group per row, few rows (decode) and many rows (prefill), fp32/bf16/fp16 inputs,
GPTQ and AWQ packings.  Packing conversions for device kernels are checked with golden words."""

import pytest
import torch

from autoround.backends import (
    ArkAwqQuantLinear, ArkQuantLinear, AtenInt4QuantLinear, AtenInt8QuantLinear, NativeCpuAwqQuantLinear,
    NativeCpuQuantLinear, TorchQuantLinear,
)
from autoround.backends import conversions as cv
from autoround.backends import native_cpu
from autoround.backends.device_kernels import hpu_pack_output_dim
from autoround.quantizer.formats.packing import (
    pack_gptq_qweight, pack_gptq_qzeros, unpack_gptq_qzeros, unpack_stream,
)
from autoround.quantizer.qmath import group_layout

try:
    import auto_round_kernel  # noqa: F401

    HAS_ARK = True
except ImportError:
    HAS_ARK = False

AVX2_REASON = native_cpu.unavailable_reason()
needs_avx2 = pytest.mark.skipif(AVX2_REASON is not None, reason=f"avx2 kernel unavailable: {AVX2_REASON}")
needs_ark = pytest.mark.skipif(not HAS_ARK, reason="auto-round-lib (auto_round_kernel) is not installed")


def integers(in_f, out_f, bits, gs, sym, seed):
    g = torch.Generator().manual_seed(seed)
    _, ng = group_layout(in_f, gs)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    z = torch.full((ng, out_f), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (ng, out_f), generator=g)
    s = (torch.rand(ng, out_f, generator=g) * 0.02 + 0.001) * torch.where(torch.rand(ng, out_f, generator=g) < 0.3, -1, 1)
    return q, z, s.half(), torch.randn(out_f, generator=g)


def build(cls, in_f, out_f, bits, gs, sym, seed=0, zero_offset=1, awq=False):
    q, z, s, b = integers(in_f, out_f, bits, gs, sym, seed)
    layer = cls(in_f, out_f, bits, gs, sym, True, zero_offset=0 if awq else zero_offset)
    if awq:
        layer.qweight.copy_(cv.pack_awq_words(q.t()))
        layer.qzeros.copy_(cv.pack_awq_words(z))
    else:
        layer.qweight.copy_(pack_gptq_qweight(q, bits))
        layer.qzeros.copy_(pack_gptq_qzeros((z - zero_offset) & (2**bits - 1), bits))
    layer.scales.copy_(s)
    layer.bias.copy_(b)
    layer.post_init()
    return layer


def check(kernel, ref, in_f, dtype=torch.float32, rows=(1, 3, 5, 40)):
    for m in rows:
        x = torch.randn(2, m, in_f, generator=torch.Generator().manual_seed(m))
        want = ref(x)
        got = kernel(x.to(dtype))
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-4 if dtype == torch.float32 else (1e-2 if dtype == torch.float16 else 2e-2)
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < tol, f"{kernel.kernel_name} rows={m} {dtype}: relative error {err:.2e}"


SHAPES = [(576, 192, 128), (256, 64, 64), (96, 32, -1), (160, 64, 32)]  # 576 % 128 and 160 % 64 ragged


@needs_avx2
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", SHAPES + [(160, 64, 64)])
def test_avx2_matches_reference(bits, sym, shape):
    in_f, out_f, gs = shape
    ref = build(TorchQuantLinear, in_f, out_f, bits, gs, sym)
    kernel = build(NativeCpuQuantLinear, in_f, out_f, bits, gs, sym)
    check(kernel, ref, in_f)
    assert kernel.qweight.numel() == 0  # the checkpoint words were freed after the repack
    packed_bytes = kernel.packed_weight.numel()
    assert packed_bytes * 8 <= (4 if bits <= 4 else 8) * out_f * (in_f + 127)  # stays packed


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_avx2_half_inputs(dtype):
    ref = build(TorchQuantLinear, 576, 192, 4, 128, False)
    check(build(NativeCpuQuantLinear, 576, 192, 4, 128, False), ref, 576, dtype=dtype)


@needs_avx2
@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_avx2_survives_model_casts_and_copies(cast):
    """The C kernel reads its scales as fp32: casting the model after loading (model.to(torch.bfloat16),
    model.half()) must leave them fp32 (before, the kernel read 16-bit memory as fp32: NaN, and past the end);
    deepcopy/pickle re-bind the kernel to the copied buffers."""
    import copy
    import io

    ref = build(TorchQuantLinear, 576, 192, 4, 128, True)
    kernel = build(NativeCpuQuantLinear, 576, 192, 4, 128, True)
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(kernel)
    buf = io.BytesIO()
    torch.save(kernel, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    del kernel  # the copies must not point into the original's buffers
    for k in (twin, loaded):
        assert torch.equal(k(x), twin(x))
    check(twin, ref, 576)
    dtype = getattr(torch, "float16" if cast == "half" else cast)
    getattr(twin, cast)() if cast == "half" else twin.to(dtype)
    assert twin.scale.dtype == twin.zero_scale.dtype == torch.float32 and twin.bias.dtype == dtype
    ref.bias.data = ref.bias.to(dtype).float()  # the bias is cast like any other tensor
    check(twin, ref, 576, dtype=dtype)
    twin.to("meta")
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        twin(x)


@needs_ark
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_ark_matches_reference(bits, sym, shape):
    in_f, out_f, gs = shape
    ref = build(TorchQuantLinear, in_f, out_f, bits, gs, sym)
    check(build(ArkQuantLinear, in_f, out_f, bits, gs, sym), ref, in_f)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(576, 192, 128), (256, 64, 64), (96, 32, -1)])
def test_torch_int4_matches_reference(bits, sym, shape):
    in_f, out_f, gs = shape
    ref = build(TorchQuantLinear, in_f, out_f, bits, gs, sym)
    kernel = build(AtenInt4QuantLinear, in_f, out_f, bits, gs, sym)
    check(kernel, ref, in_f, rows=(1, 3))
    check(kernel, ref, in_f, dtype=torch.bfloat16, rows=(1,))


@pytest.mark.parametrize("sym", [True, False])
def test_torch_int8_matches_reference(sym):
    ref = build(TorchQuantLinear, 256, 64, 8, -1, sym)
    kernel = build(AtenInt8QuantLinear, 256, 64, 8, -1, sym)
    check(kernel, ref, 256, rows=(1, 3))
    check(kernel, ref, 256, dtype=torch.bfloat16, rows=(1,))


def test_torch_int8_refuses_groups():
    with pytest.raises(ValueError, match="one group per row"):
        build(AtenInt8QuantLinear, 256, 64, 8, 64, True)


def test_raw_zero_points_packing():
    """``auto_round`` packing stores zero points as they are (zero_offset 0)."""
    ref = build(TorchQuantLinear, 256, 64, 4, 64, False, zero_offset=0)
    kernels = [AtenInt4QuantLinear] + ([NativeCpuQuantLinear] if AVX2_REASON is None else [])
    for cls in kernels + ([ArkQuantLinear] if HAS_ARK else []):
        check(build(cls, 256, 64, 4, 64, False, zero_offset=0), ref, 256, rows=(1, 20))


@pytest.mark.parametrize("sym", [True, False])
def test_awq_variants_match_gptq_reference(sym):
    ref = build(TorchQuantLinear, 576, 192, 4, 128, sym, zero_offset=0)
    classes = ([NativeCpuAwqQuantLinear] if AVX2_REASON is None else []) + ([ArkAwqQuantLinear] if HAS_ARK else [])
    if not classes:
        pytest.skip("neither avx2 nor ark is available")
    for cls in classes:
        check(build(cls, 576, 192, 4, 128, sym, awq=True), ref, 576, rows=(1, 20))


def test_forward_before_post_init_raises():
    layer = AtenInt4QuantLinear(64, 32, 4, 32, True, False)
    with pytest.raises(RuntimeError, match="post_init"):
        layer(torch.randn(1, 64))


# ---- conversions (pure; they back the declared CUDA/XPU/HPU kernels) ----

def test_gptq_v1_v2_golden_and_round_trip():
    v1 = pack_gptq_qzeros(torch.full((2, 16), 7), 4)  # 4-bit sym zero point 8 stored as 7
    assert {int(w) & 0xFFFFFFFF for w in v1.flatten()} == {0x77777777}
    v2 = cv.gptq_v1_to_v2_qzeros(v1, 4, 16)
    assert {int(w) & 0xFFFFFFFF for w in v2.flatten()} == {0x88888888}
    z = torch.randint(0, 16, (3, 64))
    packed = pack_gptq_qzeros(z, 4)
    assert torch.equal(cv.gptq_v2_to_v1_qzeros(cv.gptq_v1_to_v2_qzeros(packed, 4, 64), 4, 64), packed)
    # asym zero point 0 under zp-1 wraps to 15 and comes back as 0
    wrapped = pack_gptq_qzeros(torch.full((1, 8), 15), 4)
    assert unpack_gptq_qzeros(cv.gptq_v1_to_v2_qzeros(wrapped, 4, 8), 4, 8).eq(0).all()


def test_awq_golden_word_and_conversion():
    word = cv.pack_awq_words(torch.arange(8, dtype=torch.uint8).view(1, 8))
    assert int(word) & 0xFFFFFFFF == 0x75316420  # columns 0..7 at nibbles [0, 4, 1, 5, 2, 6, 3, 7]
    q = torch.randint(0, 16, (64, 32), dtype=torch.uint8)  # [in, out]
    z = torch.randint(0, 16, (2, 32), dtype=torch.uint8)
    assert torch.equal(cv.unpack_awq_words(cv.pack_awq_words(q)), q)
    qweight, qzeros = cv.awq_to_gptq(cv.pack_awq_words(q), cv.pack_awq_words(z), zero_offset=1)
    assert torch.equal(unpack_stream(qweight, 4, 64), q)
    assert torch.equal(unpack_gptq_qzeros(qzeros, 4, 32), (z.int() - 1) & 0xF)


def test_hpu_packs_along_output_dimension():
    q = torch.randint(0, 16, (32, 16))  # [out, in]
    z = torch.randint(0, 16, (1, 32))
    qweight, qzeros = hpu_pack_output_dim(pack_gptq_qweight(q, 4), pack_gptq_qzeros((z - 1) & 0xF, 4), 16, 32)
    assert qweight.shape == (16, 4) and qzeros.shape == (1, 4)
    first = int(qweight[0, 0]) & 0xFFFFFFFF  # input row 0, output columns 0..7, least significant first
    assert first == sum(int(q[j, 0]) << (4 * j) for j in range(8))
    assert torch.equal(unpack_stream(qzeros.t().contiguous(), 4, 32).t(), z.to(torch.uint8))


def test_marlin_scale_permutation():
    grouped, single = cv.marlin_scale_perm()
    assert sorted(grouped) == list(range(64)) and grouped[:3] == [0, 8, 16]
    assert sorted(single) == list(range(32)) and single[:8] == [0, 1, 8, 9, 16, 17, 24, 25]
    s = torch.arange(2 * 128, dtype=torch.float16).view(2, 128)
    out = cv.marlin_permute_scales(s, 256, 128)
    assert out.shape == s.shape and out[0, 1] == s[0, 8]


def test_padded_group_layout():
    assert cv.padded_group_layout(576, 128) == (128, 5, 640)
    assert cv.padded_group_layout(600, -1, multiple=32) == (608, 1, 608)
    assert cv.padded_group_layout(256, 64) == (64, 4, 256)
