"""GGUF block quantization: golden vectors with bit diagrams, bit-exact agreement with the ``gguf`` package,
and llama.cpp's per-tensor type rules."""

import numpy as np
import pytest
import torch

import gguf
from autoround.quantizer.dtypes import gguf as gq

ALL_TYPES = gq.QUANT_TYPES + ("bf16", "f16")


def _gtype(name):
    return gguf.GGMLQuantizationType(gq.GGML_TYPES[name].ggml_id)


def _hex(b):
    return " ".join(f"{int(v):02x}" for v in b.reshape(-1))


def test_type_table_matches_the_gguf_package():
    for name, t in gq.GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[_gtype(name)] == (t.block_size, t.type_size), name
        assert _gtype(name).name.lower() == name
    for name, ft in gq.GGUF_FILE_TYPES.items():
        assert gguf.LlamaFileType(ft.ftype_id).name == "MOSTLY_" + name.upper()


# --- golden vectors ---------------------------------------------------------------------------------------


def test_golden_q4_0():
    """q4_0 block, 18 bytes:
        byte 0-1  d (fp16, little endian)       d = max / -8 (max = value of largest magnitude)
        byte 2+j  bits 7..4 = q[j+16], bits 3..0 = q[j]      (j = 0..15),  value = d * (q - 8)
    x = 0.5 * (-8, -7, ..., 7, -8, ..., 7): max = -4 -> d = 0.5 = fp16 0x3800, q[j] = j -> byte j*0x11."""
    x = 0.5 * torch.cat([torch.arange(-8.0, 8), torch.arange(-8.0, 8)]).reshape(1, 32)
    b = gq.quantize_tensor(x, "q4_0")
    assert _hex(b) == "00 38 " + " ".join(f"{j * 0x11:02x}" for j in range(16))
    assert torch.equal(gq.dequantize_tensor(b, "q4_0", (1, 32)), x)
    assert np.array_equal(gguf.quants.dequantize(b.numpy(), _gtype("q4_0")), x.numpy())


def test_golden_q8_0():
    """q8_0 block, 34 bytes: [d fp16][32 x int8 q], value = d * q, d = absmax / 127.
    x = (-127, -15, -14, ..., 15): d = 1.0 = fp16 0x3c00; q = x -> 0x81, 0xf1 ... 0x0f."""
    x = torch.cat([torch.tensor([-127.0]), torch.arange(-15.0, 16)]).reshape(1, 32)
    b = gq.quantize_tensor(x, "q8_0")
    expect = "00 3c 81 " + " ".join(f"{v & 0xFF:02x}" for v in range(-15, 16))
    assert _hex(b) == expect
    assert np.array_equal(gguf.quants.dequantize(b.numpy(), _gtype("q8_0")), x.numpy())


def test_golden_q4_k():
    """q4_k super-block (256 values = 8 sub-blocks of 32), 144 bytes:
        byte 0-1 d, 2-3 dmin (fp16); value = d*sc[j]*q - dmin*m[j] for sub-block j
        byte 4-15: 8 x 6-bit sc and 8 x 6-bit m:
            byte 4+j  (j<4): bits 5..0 sc[j],  bits 7..6 = sc[j+4] >> 4
            byte 8+j  (j<4): bits 5..0 m[j],   bits 7..6 = m[j+4] >> 4
            byte 12+j (j<4): bits 3..0 sc[j+4] & 15, bits 7..4 m[j+4] & 15
        byte 16+32c+l (c<4, l<32): bits 3..0 q of value 64c+l, bits 7..4 q of value 64c+32+l
    Each sub-block holds an exact grid s_j*q - m_j (q = 0..15 twice), s_j = k_j * 2^-10, m_j = n_j * 2^-9,
    max k = max n = 63, so llama.cpp's search recovers d = 2^-10 (0x1400), dmin = 2^-9 (0x1800), sc = k, m = n."""
    k = [63, 21, 9, 7, 3, 1, 40, 33]
    n = [0, 1, 7, 9, 21, 63, 3, 50]
    q = torch.cat([torch.arange(16.0), torch.arange(15.0, -1, -1)])
    x = torch.cat([k[j] * 2**-10 * q - n[j] * 2**-9 for j in range(8)]).reshape(1, 256)
    b = gq.quantize_tensor(x, "q4_k")[0]
    assert _hex(b[:4]) == "00 14 00 18"
    sc_bytes = [k[j] | ((k[j + 4] >> 4) << 6) for j in range(4)]
    m_bytes = [n[j] | ((n[j + 4] >> 4) << 6) for j in range(4)]
    hi_bytes = [(k[j + 4] & 15) | ((n[j + 4] & 15) << 4) for j in range(4)]
    assert b[4:16].tolist() == sc_bytes + m_bytes + hi_bytes
    qi = q.to(torch.int64).tolist() * 8
    assert b[16:48].tolist() == [qi[l] | (qi[32 + l] << 4) for l in range(32)]
    assert torch.equal(gq.dequantize_tensor(b.reshape(1, -1), "q4_k", (1, 256)), x)
    assert np.array_equal(gguf.quants.dequantize(b.reshape(1, -1).numpy(), _gtype("q4_k")), x.numpy())


def test_golden_q6_k():
    """q6_k super-block (16 sub-blocks of 16), 210 bytes:
        byte 0-127   ql: per half h (128 values, 64 bytes): byte 64h+l      = lo4(v[l])    | lo4(v[l+64]) << 4
                                                             byte 64h+32+l   = lo4(v[l+32]) | lo4(v[l+96]) << 4
        byte 128-191 qh: byte 128+32h+l = hi2(v[l]) | hi2(v[l+32]) << 2 | hi2(v[l+64]) << 4 | hi2(v[l+96]) << 6
        byte 192-207 int8 sub-block scales; byte 208-209 d (fp16); value = d * sc[j] * (q - 32)
    Sub-block j = (j+1) * 2^-10 * (-32, -28, ..., 28): d = -2^-13 (fp16 0x8800), sc[j] = -8(j+1)."""
    lv = torch.arange(-32.0, 32, 4)
    x = torch.cat([(j + 1) * 2**-10 * lv for j in range(16)]).reshape(1, 256)
    b = gq.quantize_tensor(x, "q6_k")[0]
    assert _hex(b[208:]) == "00 88"
    assert b[192:208].view(torch.int8).tolist() == [-8 * (j + 1) for j in range(16)]
    stored = (lv + 32).to(torch.int64).tolist() * 16  # q of every value
    assert b[0] == (stored[0] & 15) | ((stored[64] & 15) << 4)
    assert b[32] == (stored[32] & 15) | ((stored[96] & 15) << 4)
    assert b[128] == (stored[0] >> 4) | ((stored[32] >> 4) << 2) | ((stored[64] >> 4) << 4) | ((stored[96] >> 4) << 6)
    assert torch.equal(gq.dequantize_tensor(b.reshape(1, -1), "q6_k", (1, 256)), x)
    assert np.array_equal(gguf.quants.dequantize(b.reshape(1, -1).numpy(), _gtype("q6_k")), x.numpy())


def test_golden_q5_0_high_bits():
    """q5_0 block, 22 bytes: [d fp16][qh: uint32 LE, bit j = q[j] >> 4][16 bytes low nibbles as q4_0].
    x = (-16..15): max = -16 -> d = 1.0, q[j] = j: high bits set for j >= 16 -> qh = 0xffff0000."""
    x = torch.arange(-16.0, 16).reshape(1, 32)
    b = gq.quantize_tensor(x, "q5_0")[0]
    assert _hex(b[:6]) == "00 3c 00 00 ff ff"
    assert b[6:].tolist() == [j | (j << 4) for j in range(16)]


def test_kscale_packing_round_trip():
    g = torch.Generator().manual_seed(0)
    sc, m = torch.randint(0, 64, (50, 8), generator=g), torch.randint(0, 64, (50, 8), generator=g)
    assert all(torch.equal(a, b) for a, b in zip(gq.unpack_kscales(gq.pack_kscales(sc, m)), (sc, m)))
    l3 = torch.randint(0, 64, (50, 16), generator=g)
    assert torch.equal(gq.unpack_q3_scales(gq.pack_q3_scales(l3)), l3 - 32)


# --- agreement with the gguf package ----------------------------------------------------------------------


def _weights():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 512, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero block and super-block
    w[1, 5] = 1.5  # an outlier
    w[2] = w[2].abs()  # all-positive rows (asymmetric mins clamp at 0)
    w[3, 32:64] = -1e-3
    return w


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_dequantize_is_bit_exact_with_gguf(qtype, weighted):
    w = _weights()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(4)) + 0.05 if weighted else None
    b = gq.quantize_tensor(w, qtype, imp)
    ours = gq.dequantize_tensor(b, qtype, tuple(w.shape)).numpy()
    ref = gguf.quants.dequantize(b.numpy(), _gtype(qtype)).reshape(ours.shape)
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    rel = float(((torch.from_numpy(ours) - w) ** 2).sum() / (w**2).sum())
    bound = {2: 0.15, 3: 0.05, 4: 0.015, 5: 0.004, 6: 0.001, 8: 1e-4}.get(gq.GGML_TYPES[qtype].bits, 1e-5)
    assert rel < bound, (qtype, rel)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16"])
def test_reference_quantization_bytes_equal_gguf(qtype):
    w = _weights()
    ours = gq.quantize_tensor(w, qtype).numpy()
    ref = np.ascontiguousarray(gguf.quants.quantize(w.numpy(), _gtype(qtype))).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl"])
def test_importance_weighting_lowers_the_weighted_error(qtype):
    w = _weights()[4:]
    g = torch.Generator().manual_seed(5)
    imp = torch.exp(3 * torch.randn(512, generator=g))  # a few input channels matter much more
    errs = []
    for i in (None, imp):
        deq = gq.dequantize_tensor(gq.quantize_tensor(w, qtype, i), qtype, tuple(w.shape))
        errs.append(float((((deq - w) ** 2) * imp).sum()))
    assert errs[1] < errs[0], errs


def test_quantize_rejects_rows_that_do_not_fit_the_block():
    with pytest.raises(ValueError, match="multiple of the q4_k block size 256"):
        gq.quantize_tensor(torch.zeros(2, 576), "q4_k")


# --- llama.cpp's per-tensor type rules --------------------------------------------------------------------


def test_use_more_bits_layers():
    assert [i for i in range(32) if gq.use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_rules_on_a_7b_shape():
    t = lambda cat, i=0, row=4096, **kw: gq.tensor_type("q4_k_m", cat, row, i, 32, **kw)  # noqa: E731
    assert t("attn_q") == t("attn_k") == t("attn_output") == t("ffn_gate") == t("ffn_up") == "q4_k"
    assert [t("attn_v", i) for i in (0, 4, 6, 7)] == ["q6_k", "q4_k", "q6_k", "q4_k"]
    assert [t("ffn_down", i, row=11008) for i in (0, 4, 6, 31)] == ["q6_k", "q4_k", "q6_k", "q6_k"]
    assert t("output") == "q6_k" and t("token_embd") == "q4_k" and t("token_embd", tied_output=True) == "q6_k"


def test_other_file_type_rules():
    assert gq.tensor_type("q3_k_m", "attn_v", 4096, 1, 32) == "q5_k"
    assert gq.tensor_type("q3_k_m", "attn_v", 4096, 2, 32) == "q4_k"
    assert gq.tensor_type("q3_k_m", "ffn_down", 4096, 1, 32) == "q5_k"
    assert gq.tensor_type("q3_k_m", "ffn_down", 4096, 2, 32) == "q4_k"
    assert gq.tensor_type("q3_k_m", "attn_output", 4096) == "q4_k"
    assert gq.tensor_type("q3_k_l", "attn_output", 4096) == "q5_k"
    assert gq.tensor_type("q3_k_s", "attn_v", 4096) == "q3_k"
    assert gq.tensor_type("q2_k_s", "attn_v", 4096, n_gqa=4) == "q4_k"
    assert gq.tensor_type("q2_k_s", "attn_v", 4096, n_gqa=1) == "q2_k"
    assert gq.tensor_type("q2_k_s", "ffn_down", 4096, 3, 32) == "q4_k"
    assert gq.tensor_type("q2_k_s", "ffn_down", 4096, 4, 32) == "q2_k"
    assert gq.tensor_type("q4_k_s", "attn_v", 4096, 3, 32) == "q5_k"
    assert gq.tensor_type("q4_k_s", "attn_v", 4096, 4, 32) == "q4_k"
    assert gq.tensor_type("q4_0", "output", 4096) == "q6_k"
    assert gq.tensor_type("q8_0", "output", 4096) == "q8_0"
    assert gq.tensor_type("q6_k", "ffn_down", 4096) == "q6_k"


def test_rows_that_do_not_fit_super_blocks_fall_back_as_llama_cpp():
    # SmolLM2: 576 = 2.25 x 256
    assert gq.tensor_type("q4_k_m", "attn_q", 576) == "q5_0"
    assert gq.tensor_type("q5_k_m", "attn_q", 576) == "q5_1"
    assert gq.tensor_type("q3_k_m", "attn_q", 576) == "q4_0"
    assert gq.tensor_type("q4_k_m", "attn_v", 576, 0, 30) == "q8_0"  # q6_k -> q8_0
    assert gq.tensor_type("q4_k_m", "ffn_down", 1536, 0, 30) == "q6_k"
    assert gq.tensor_type("q4_0", "token_embd", 576, tied_output=True) == "q8_0"  # q6_k would not fit
    assert gq.tensor_type("q4_0", "token_embd", 576) == "q4_0"
    assert gq.fit_row("q4_0", 48) == "f16"
