"""MXFP / MXINT / NVFP4 / FP8 weight families, activation quantization, and the compressed-tensors exports:
golden element grids and bits, round trips through compressed-tensors' own quantize/dequantize, checkpoints
read back by compressed-tensors + transformers, and bad input refused before any work."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from autoround import AutoRound
from autoround.quantizer import act_quant
from autoround.quantizer.dtypes import family_of
from autoround.quantizer.dtypes.minifloat import E2M1, E4M3, INT4_MX, decode, encode, round_to_grid
from autoround.quantizer.errors import AutoRoundError, SchemeError
from autoround.quantizer.formats import formats_supporting
from autoround.quantizer.schemes import PRESETS, QuantScheme, resolve_scheme

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
FLOAT_PRESETS = ("MXFP4", "MXFP4_RCEIL", "MXFP8", "MXFP8_RCEIL", "MXINT4", "NVFP4", "FPW8A16", "FP8_STATIC",
                 "FP8_BLOCK")


# --- element grids and codes ---------------------------------------------------------------------------------


def test_e2m1_grid_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 100.0, -0.75, -5.0, 0.0])
    want = [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0, 0.0]
    assert round_to_grid(x, E2M1).tolist() == want


def test_e2m1_codes_golden():
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0])
    assert encode(values, E2M1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15]
    assert torch.equal(decode(encode(values, E2M1), E2M1), values)


def test_e4m3_grid_equals_torch_float8_cast():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-3, 0.1, 1.0, 30.0, 300.0)])
    mine = round_to_grid(x, E4M3)
    torchs = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(mine, torchs)
    # the byte is float8_e4m3fn's: 1.0 = 0x38, -448 = 0xFE, the smallest subnormal 2**-9 = 0x01
    assert encode(torch.tensor([1.0, -448.0, 2.0 ** -9]), E4M3).tolist() == [0x38, 0xFE, 0x01]


def test_signround_offset_units():
    """The rounding offset ``v`` moves an E2M1 element by ``v`` itself (the reference tool's FP4 unit: up to a full
    step for the elements below 2, whose step is 0.5) and every other element by ``v`` local grid steps."""
    from autoround.quantizer.dtypes.minifloat import qdq_tiles

    one = torch.ones(1, 1)
    x = torch.tensor([[[1.05, 1.05, 5.0, 0.3]]])
    v = torch.tensor([[[0.3, -0.1, -0.45, -0.06]]])
    # 1.35 -> 1.5, 0.95 -> 1.0, 4.55 -> 4.0, 0.24 -> 0.0 (in step units the first and last would give 1.2 -> 1.0
    # and 0.27 -> 0.5)
    assert qdq_tiles(x, one, E2M1, v).flatten().tolist() == [1.5, 1.0, 4.0, 0.0]
    assert qdq_tiles(x[..., :1], one, E2M1, v[..., :1] / 2).item() == 1.0  # 1.2 -> 1.0: the unit is 1, not 0.5
    # E4M3 near 1 (step 0.125): 1.05 + 0.3 * 0.125 = 1.0875 -> 1.125, not 1.35 -> 1.375
    assert qdq_tiles(x[..., :1], one, E4M3, v[..., :1]).item() == 1.125
    # MXINT4 (uniform step 0.25): 1.05 + 0.3 * 0.25 = 1.125 -> 1.0 (ties to even: 4.5 -> 4 quarters)
    assert qdq_tiles(x[..., :1], one, INT4_MX, v[..., :1]).item() == 1.0


def test_mxint4_grid_symmetric_and_sign_magnitude_codes():
    x = torch.tensor([-2.5, -2.0, -0.125, 0.125, 0.375, 1.7, 1.9])
    q = round_to_grid(x, INT4_MX)
    assert q.tolist() == [-1.75, -1.75, -0.0, 0.0, 0.5, 1.75, 1.75]  # symmetric, as the reference's MXINT4
    assert encode(q, INT4_MX).tolist() == [15, 15, 8, 0, 2, 7, 7]  # sign-magnitude (bit 3 the sign, -0 too)
    assert torch.equal(decode(encode(q, INT4_MX), INT4_MX), q)


def test_mx_scale_rules_floor_and_rceil():
    w = torch.zeros(1, 32)
    w[0, 0] = 7.0  # log2(7) = 2.81
    floor = family_of(PRESETS["MXFP4"]).quantize(w, PRESETS["MXFP4"], None)
    # floor: 2**(floor(log2 7) - emax 2) = 1, so 7 saturates at 6
    assert floor.scale.item() == 1.0 and floor.dequantize()[0, 0].item() == 6.0
    rceil = family_of(PRESETS["MXFP4"]).quantize(w, PRESETS["MXFP4"].replace(data_type="mx_fp_rceil"), None)
    # rceil: 2**ceil(log2(7 / 6)) = 2, 7 / 2 = 3.5 -> 4 (ties to even) -> 8
    assert rceil.scale.item() == 2.0 and rceil.dequantize()[0, 0].item() == 8.0


def test_nvfp4_scales_follow_nvidia_recipe():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    s = PRESETS["NVFP4"]
    qw = family_of(s).quantize(w, s, None)
    gs = 448 * 6 / w.abs().max()
    assert torch.allclose(qw.global_scale, gs.reshape(1))
    group_amax = w.reshape(8, 4, 16).abs().amax(-1)
    want = (group_amax / 6 * gs).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(qw.scale, want)
    assert (qw.dequantize() - w).abs().max() < w.abs().max() / 6  # half a step of the coarsest group


# --- compressed-tensors' own math agrees bit for bit ----------------------------------------------------------


def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


@pytest.mark.parametrize("preset", ["MXFP4", "MXFP8", "NVFP4", "FPW8A16", "FP8_STATIC", "FP8_BLOCK"])
def test_round_trip_through_compressed_tensors_quantize_dequantize(preset):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 256, generator=g) * 0.05
    s = PRESETS[preset]
    qw = family_of(s).quantize(w, s, torch.rand(256, generator=g))  # optimized RTN: searched scales
    fam = family_of(s).name
    glob = qw.global_scale if fam == "nvfp" else None
    if fam == "fp8" and isinstance(s.group_size, tuple):
        args = _ct_args(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True)
        scale = qw.scale
    elif fam == "fp8" and s.group_size == 0:
        args, scale = _ct_args(num_bits=8, type="float", strategy="tensor", symmetric=True), qw.scale.reshape(1)
    elif fam == "fp8":
        args, scale = _ct_args(num_bits=8, type="float", strategy="channel", symmetric=True), qw.scale
    else:
        args = _ct_args(num_bits=s.bits, type="float", strategy="tensor_group" if glob is not None else "group",
                        group_size=s.group_size, symmetric=True)
        scale = qw.scale
    zp = torch.zeros_like(scale)
    q = quantize(x=w, scale=scale, zero_point=zp, args=args, global_scale=glob, dtype=torch.float32)
    assert torch.equal(q, qw.values())  # the same elements
    dq = dequantize(x_q=q, scale=scale, zero_point=zp, args=args, global_scale=glob, dtype=torch.float32)
    assert torch.equal(dq, qw.dequantize())  # the same weights


def test_e2m1_packing_equals_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    from autoround.quantizer.formats.packing import pack_nibbles, unpack_nibbles

    g = torch.Generator().manual_seed(3)
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])[torch.randint(0, 8, (16, 64), generator=g)]
    vals = vals * torch.where(torch.rand(16, 64, generator=g) < 0.5, -1.0, 1.0)
    assert torch.equal(pack_nibbles(encode(vals, E2M1)), pack_fp4_to_uint8(vals))
    assert torch.equal(unpack_nibbles(pack_nibbles(encode(vals, E2M1))), encode(vals, E2M1))


# --- activation quantization -----------------------------------------------------------------------------------


def test_int8_per_token_activation_quantization():
    x = torch.tensor([[1.0, -0.5, 0.25, 127.0], [0.01, 0.02, -0.03, 0.04]])
    y = act_quant.act_qdq(x, PRESETS["INT8"])
    assert torch.equal(y[0], torch.tensor([1.0, -0.0, 0.0, 127.0]))  # step 1 in row 0
    assert torch.allclose(y[1], x[1], atol=0.04 / 127 / 2 + 1e-9)  # its own finer step in row 1


def test_static_activation_needs_amax_and_uses_it():
    s = PRESETS["FP8_STATIC"]
    assert act_quant.needs_amax(s) and not act_quant.needs_amax(PRESETS["FP8_BLOCK"])
    with pytest.raises(ValueError, match="calibrated input amax"):
        act_quant.ActQuantizer(s, None)
    x = torch.tensor([[1.0, 3.0]])
    y = act_quant.act_qdq(x, s, torch.tensor(448.0))  # scale 1: E4M3 rounding of the values themselves
    assert y.tolist() == [[1.0, 3.0]]
    assert act_quant.act_qdq(torch.tensor([[900.0]]), s, torch.tensor(448.0)).item() == 448.0  # clipped


def test_act_hook_quantizes_in_memory_model_and_tuning_gradient_flows():
    s = PRESETS["MXFP4"]
    lin = torch.nn.Linear(64, 8, bias=False)
    x = torch.randn(3, 64, requires_grad=True)
    act_quant.install(lin, s, None)
    y = lin(x)
    assert torch.allclose(y, torch.nn.functional.linear(act_quant.act_qdq(x.detach(), s), lin.weight))
    y.sum().backward()  # straight through
    assert x.grad is not None and x.grad.abs().sum() > 0
    act_quant.remove(lin)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight))


# --- end to end: RTN and SignRound; llm_compressor checkpoints read by compressed-tensors + transformers ---------


@pytest.mark.parametrize("preset", FLOAT_PRESETS + ("INT8",))
def test_every_preset_quantizes_rtn_and_signround(preset):
    m = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():
        ref = m(IDS).logits
    ar = AutoRound(m, scheme=preset, iters=2, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
    model, cfg = ar.quantize("fake")
    with torch.no_grad():
        out = model(IDS).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.6
    assert all(layer.scheme == PRESETS[preset] for layer in ar.layers.values())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert hasattr(q_proj, act_quant._HOOK_ATTR) is (PRESETS[preset].act_bits < 16)
    static = PRESETS[preset].act_bits < 16 and act_quant.needs_amax(PRESETS[preset])
    assert (ar.layers["model.layers.0.self_attn.q_proj"].input_amax is not None) is static


def _qconfig(folder):
    return json.load(open(os.path.join(folder, "config.json")))["quantization_config"]


def _tensors(folder):
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


CT_CASES = {
    "NVFP4": ("nvfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                                       "weight_global_scale": torch.float32, "input_global_scale": torch.float32}),
    "MXFP4": ("mxfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "MXFP8": ("mxfp8-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8}),
    "FP8_STATIC": ("float-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32,
                                       "input_scale": torch.float32}),
    "FP8_BLOCK": ("float-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
    "FPW8A16": ("float-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
    "INT8": ("int-quantized", {"weight": torch.int8, "weight_scale": torch.float32}),
}


@pytest.mark.parametrize("preset", list(CT_CASES))
def test_llm_compressor_export_read_by_compressed_tensors(tmp_path, preset):
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    fmt, dtypes = CT_CASES[preset]
    m = tiny_llama(hidden=128, inter=256)
    ar = AutoRound(m, scheme=preset, iters=0, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="llm_compressor")
    cfg = _qconfig(out)
    assert cfg["format"] == fmt and cfg["ignore"] == ["lm_head"]
    (group,) = cfg["config_groups"].values()
    assert (group["input_activations"] is None) is (PRESETS[preset].act_bits == 16)
    t = _tensors(out)
    name = "model.layers.0.mlp.up_proj"
    assert {k[len(name) + 1:]: v.dtype for k, v in t.items() if k.startswith(name + ".")} == dtypes
    # the weights compressed-tensors decompresses equal ours (NVFP4: its decompressor works in bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    for layer_name, layer in ar.layers.items():
        theirs = loaded.get_submodule(layer_name).weight.float()
        ours = layer.weight.dequantize()
        if preset == "NVFP4":
            assert torch.allclose(theirs, ours, rtol=2 ** -8, atol=0)
        else:
            assert torch.equal(theirs, ours), layer_name
    # with activations unquantized on both sides the logits agree
    for layer_name in ar.layers:
        act_quant.remove(ar.model.get_submodule(layer_name))
    with torch.no_grad():
        ours_logits, theirs_logits = ar.model(IDS).logits, loaded(IDS).logits
    assert torch.allclose(theirs_logits, ours_logits, atol=1e-2 if preset == "NVFP4" else 1e-5)


def test_fp8_compressed_model_applies_the_same_activation_quantization(tmp_path):
    """compressed-tensors' own quantized forward (activations included) gives our in-memory logits exactly."""
    pytest.importorskip("compressed_tensors")
    m = tiny_llama(hidden=128, inter=256)
    ar = AutoRound(m, scheme="FP8_STATIC", iters=0, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="llm_compressor")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ar.model(IDS).logits)


# --- bad input: one clear error before any work ---------------------------------------------------------------


def test_bad_schemes_are_refused():
    with pytest.raises(SchemeError, match="fixes the group size to 16"):
        resolve_scheme("NVFP4", group_size=32)
    with pytest.raises(SchemeError, match="fixes the group size to 32"):
        resolve_scheme("MXFP4", group_size=128)
    with pytest.raises(SchemeError, match="no 3-bit element"):
        resolve_scheme("MXFP4", bits=3)
    with pytest.raises(SchemeError, match="symmetric only"):
        resolve_scheme("FP8_STATIC", sym=False)
    with pytest.raises(SchemeError, match="2-D blocks"):
        QuantScheme(bits=4, group_size=(128, 128))
    with pytest.raises(SchemeError, match="act_bits=6 is not supported"):
        resolve_scheme("W4A16", act_bits=6)
    with pytest.raises(SchemeError, match="static activations"):
        resolve_scheme("FP8_STATIC", act_group_size=128)
    with pytest.raises(SchemeError, match="not built yet"):
        resolve_scheme("MXFP6")


def test_formats_that_cannot_hold_a_float_scheme_refuse_it_before_work(tmp_path):
    assert formats_supporting(PRESETS["MXFP4"]) == ["auto_round", "llm_compressor", "fake"]
    assert formats_supporting(PRESETS["MXINT4"]) == ["auto_round", "fake"]
    assert formats_supporting(PRESETS["FP8_BLOCK"]) == ["auto_round", "llm_compressor", "fake", "fp8"]
    assert formats_supporting(PRESETS["INT8_W8A8"]) == ["llm_compressor", "fake"]
    ar = AutoRound(tiny_llama(), scheme="MXINT4", iters=0, dataset=CALIB, nsamples=8, seqlen=32)
    with pytest.raises(Exception, match="no MX integer"):
        ar.quantize_and_save(str(tmp_path / "out"), format="llm_compressor")
    assert not (tmp_path / "out").exists() and not ar.quantized
    ar = AutoRound(tiny_llama(), scheme="INT8_W8A8", iters=0, dataset=CALIB, nsamples=8, seqlen=32)
    with pytest.raises(Exception, match="cannot record the activation quantization.*llm_compressor"):
        ar.quantize_and_save(str(tmp_path / "out2"), format="auto_round")
    assert not (tmp_path / "out2").exists()
    for fmt in ("auto_gptq", "auto_round:auto_gptq", "auto_awq", "mlx"):
        ar = AutoRound(tiny_llama(), scheme="MXFP4", iters=0, dataset=CALIB, nsamples=8, seqlen=32)
        with pytest.raises(Exception):
            ar.quantize_and_save(str(tmp_path / "out3"), format=fmt)
        assert not (tmp_path / "out3").exists() and not ar.quantized
    ar = AutoRound(tiny_llama(), scheme="FP8_STATIC", iters=0, dataset=CALIB, nsamples=8, seqlen=32)
    with pytest.raises(Exception, match="2-D blocks"):
        ar.quantize_and_save(str(tmp_path / "out4"), format="fp8")
    # one auto_round checkpoint has one packing: MX weights beside integer ones are refused before any work
    ar = AutoRound(tiny_llama(), scheme="MXFP4", iters=0, dataset=CALIB, nsamples=8, seqlen=32,
                   layer_config={"model.layers.0.mlp.up_proj": "W4A16"})
    with pytest.raises(Exception, match="one auto_round checkpoint has one packing"):
        ar.quantize_and_save(str(tmp_path / "out5"), format="auto_round")
    assert not (tmp_path / "out5").exists() and not ar.quantized


# --- the reference's auto_round packings, read back by our transformers loader ---------------------------------

AR_CASES = {  # preset: (packing_format, {tensor suffix: dtype})
    "MXFP4": ("auto_round:llm_compressor", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "MXFP4_RCEIL": ("auto_round:llm_compressor", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "MXFP8": ("auto_round:llm_compressor", {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8}),
    "MXINT4": ("auto_round", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "NVFP4": ("auto_round:llm_compressor", {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                                            "weight_global_scale": torch.float32,
                                            "input_global_scale": torch.float32}),
    "FPW8A16": ("auto_round:fp8_static", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
    "FP8_STATIC": ("auto_round:fp8_static", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32,
                                             "input_scale": torch.float32}),
    "FP8_BLOCK": ("auto_round:fp8", {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32}),
}


@pytest.mark.parametrize("preset", list(AR_CASES))
def test_auto_round_float_export_loads_with_the_same_logits(tmp_path, preset):
    """The reference's tensor names and config keys; our loader (torch_float kernel, activations quantized as the
    config says) gives the fake-quantized model's logits exactly."""
    from autoround import AutoRoundConfig  # noqa: F401  (registers the loader)

    packing, dtypes = AR_CASES[preset]
    m = tiny_llama(hidden=256, inter=512)
    ar = AutoRound(m, scheme=preset, iters=0, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"))  # no format named: auto_round, as the reference
    cfg = _qconfig(out)
    s = PRESETS[preset]
    assert cfg["quant_method"] == "auto-round" and cfg["packing_format"] == packing
    assert (cfg["bits"], cfg["data_type"], cfg["act_bits"]) == (s.bits, s.data_type, s.act_bits)
    if s.act_bits < 16:
        assert (cfg["act_data_type"], cfg["act_dynamic"]) == (s.act_scheme().data_type, s.act_dynamic)
    t = _tensors(out)
    name = "model.layers.0.mlp.up_proj"
    assert {k[len(name) + 1:]: v.dtype for k, v in t.items() if k.startswith(name + ".")} == dtypes
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    kernel = loaded.get_submodule(name)
    assert kernel.kernel_name == "torch_float"
    assert torch.equal(kernel.quantized_weight().dequantize(), ar.layers[name].weight.dequantize())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ar.model(IDS).logits)


def test_fp8_format_is_read_by_transformers_fine_grained_fp8(tmp_path):
    """``--format fp8`` (DeepSeek-V3 layout) loads with transformers' own FP8 quantizer, which dequantizes on a CPU."""
    m = tiny_llama(hidden=256, inter=512)
    ar = AutoRound(m, scheme="FP8_BLOCK", iters=0, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="fp8")
    cfg = _qconfig(out)
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128]
    assert cfg["activation_scheme"] == "dynamic" and cfg["ignored_layers"] == ["lm_head"]
    t = _tensors(out)
    name = "model.layers.0.mlp.up_proj"
    assert t[name + ".weight_scale_inv"].shape == (4, 2) and t[name + ".weight"].dtype == torch.float8_e4m3fn
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for layer_name, layer in ar.layers.items():  # transformers dequantizes to bfloat16
        theirs = loaded.get_submodule(layer_name).weight.float()
        assert torch.allclose(theirs, layer.weight.dequantize(), rtol=2 ** -8, atol=0), layer_name


def test_act_scale_env(monkeypatch):
    monkeypatch.setenv("AR_ACT_SCALE", "0.5")
    ar = AutoRound(tiny_llama(), scheme="W4A16", iters=0, disable_opt_rtn=True)
    with pytest.raises(AutoRoundError, match="no layer quantizes its activations"):
        ar.quantize("fake")
    ar = AutoRound(tiny_llama(), scheme="MXFP4", iters=0, disable_opt_rtn=True)
    with pytest.raises(AutoRoundError, match="dynamic scale"):
        ar.quantize("fake")
    ar = AutoRound(tiny_llama(), scheme="FP8_STATIC", iters=0, disable_opt_rtn=True, dataset=CALIB, nsamples=8,
                   seqlen=32)
    ar.quantize("fake")
    half = ar.layers["model.layers.0.mlp.up_proj"].input_amax
    monkeypatch.setenv("AR_ACT_SCALE", "1")
    ar = AutoRound(tiny_llama(), scheme="FP8_STATIC", iters=0, disable_opt_rtn=True, dataset=CALIB, nsamples=8,
                   seqlen=32)
    ar.quantize("fake")
    assert torch.allclose(half * 2, ar.layers["model.layers.0.mlp.up_proj"].input_amax)


@pytest.mark.parametrize("preset", ["NVFP4", "FP8_BLOCK", "MXFP4"])
def test_resume_store_keeps_float_weights(tmp_path, preset):
    import logging

    from autoround.quantizer.resume import ResumeStore

    s = PRESETS[preset]
    qw = family_of(s).quantize(torch.randn(256, 256, generator=torch.Generator().manual_seed(4)), s, None)
    store = ResumeStore.open(tmp_path / "state", {"k": 1}, resume=False, log=logging.getLogger("t"))
    store.save_block("model.layers.0", {"mlp.down_proj": qw}, (1.0, 0.5), {"mlp.down_proj": (0.75, 1.0)})
    again = ResumeStore.open(tmp_path / "state", {"k": 1}, resume=True, log=logging.getLogger("t"))
    weights, _, ratios = again.load_block("model.layers.0")
    back = weights["mlp.down_proj"]
    assert ratios == {"mlp.down_proj": (0.75, 1.0)}  # the activation clip ratios come back with the weights
    assert back.block == qw.block and back.data_type == qw.data_type
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("iters", [0, 2])
def test_nvfp4_fused_siblings_share_one_global_scale(monkeypatch, iters):
    """q/k/v and gate/up (fused into one layer by the engines) get one weight global scale, from the largest
    |weight| among them; AR_NVFP4_FUSED_LAYER_GLOBAL_SCALE=0 gives each its own."""
    def scales(env):
        monkeypatch.setenv("AR_NVFP4_FUSED_LAYER_GLOBAL_SCALE", env)
        m = tiny_llama(hidden=128, inter=256)
        amax = {n: mod.weight.abs().amax() for n, mod in m.named_modules() if n.startswith("model.layers.0.")
                and isinstance(mod, torch.nn.Linear)}
        ar = AutoRound(m, scheme="NVFP4", iters=iters, dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
        ar.quantize("fake")
        return amax, {n.split(".")[-1]: ar.layers[n].weight.global_scale.item() for n in amax}

    amax, shared = scales("1")
    qkv = max(amax[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
    assert shared["q_proj"] == shared["k_proj"] == shared["v_proj"] == pytest.approx(2688 / qkv.item())
    assert shared["gate_proj"] == shared["up_proj"] != shared["down_proj"]
    _, own = scales("0")
    assert len({own["q_proj"], own["k_proj"], own["v_proj"]}) == 3
    assert own["o_proj"] == shared["o_proj"] and own["down_proj"] == shared["down_proj"]
