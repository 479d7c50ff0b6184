"""Every export format on tiny models: golden bits of the AWQ and compressed-tensors layouts, configs,
round trips through our loader / plain transformers / compressed-tensors, several formats from one run,
lm_head, and the errors for impossible (format, scheme) pairs."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from autoround import AutoRound, AutoRoundConfig
from autoround.backends import TorchQuantLinear
from autoround.quantizer.errors import FormatError, SchemeError
from autoround.quantizer.formats import formats_supporting, get_format, list_formats
from autoround.quantizer.formats.packing import (
    AWQ_ORDER, gptq_layer_tensors, pack_awq, pack_awq_qweight, pack_rows, unpack_awq, unpack_awq_qweight,
    unpack_rows,
)
from autoround.quantizer.qmath import quantize_weight

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def u32(t):
    return [x & 0xFFFFFFFF for x in t.reshape(-1).tolist()]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def tensors(folder):
    out = {}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def qconfig(folder):
    return json.load(open(os.path.join(folder, "config.json"))).get("quantization_config")


def run(tmp_path, fmt, model=None, **kw):
    kw.setdefault("iters", 0)
    kw.setdefault("disable_opt_rtn", True)
    ar = AutoRound(model or tiny_llama(), **kw)
    _, folders = ar.quantize_and_save(str(tmp_path / "ckpt"), format=fmt)
    return ar, folders


# --- golden bits --------------------------------------------------------------------------------------


def test_awq_interleave_golden():
    # one row, 8 columns holding 0..7.  Nibble p (bits 4p..4p+3) holds column [0,2,4,6,1,3,5,7][p]:
    #   nibble: 7    6    5    4    3    2    1    0
    #   column: 7    5    3    1    6    4    2    0     -> 0111 0101 0011 0001 0110 0100 0010 0000
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert u32(pack_awq(torch.arange(8).view(1, 8))) == [0x75316420]
    # 0xF in column 1 only: column 1 sits at nibble 4 -> bits 16..19
    v = torch.zeros(1, 8, dtype=torch.long)
    v[0, 1] = 15
    assert u32(pack_awq(v)) == [0x000F0000]
    # column 7 at nibble 7: the sign bit of the int32
    v = torch.zeros(1, 8, dtype=torch.long)
    v[0, 7] = 8
    packed = pack_awq(v)
    assert packed.dtype == torch.int32 and packed.item() == -(2**31)


def test_awq_qweight_orientation():
    # q is [out, in]; AWQ qweight is [in, out/8]: input row i, output columns 8k..8k+7 share one word
    q = torch.zeros(16, 2, dtype=torch.uint8)  # out 16, in 2
    q[:8, 1] = torch.arange(8, dtype=torch.uint8)  # input row 1, output columns 0..7
    qw = pack_awq_qweight(q)
    assert qw.shape == (2, 2)
    assert u32(qw) == [0, 0, 0x75316420, 0]
    assert torch.equal(unpack_awq_qweight(qw), q)


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (40, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_awq(pack_awq(q)), q)
    for fill in (0, 15):
        s = torch.full((3, 16), fill, dtype=torch.uint8)
        assert torch.equal(unpack_awq(pack_awq(s)), s)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        pack_awq(torch.zeros(1, 12, dtype=torch.uint8))


def test_compressed_tensors_rows_golden():
    # pack-quantized packs along each ROW (the input dimension of weight [out, in]), LSB first
    assert u32(pack_rows(torch.arange(8).view(1, 8), 4)) == [0x76543210]
    assert u32(pack_rows(torch.tensor([[0x11, 0x22, 0x33, 0xFF]]), 8)) == [0xFF332211]
    # signed -8..7 stored with offset 8: signed 0 -> 8, so a row of zeros reads 0x88888888
    assert u32(pack_rows(torch.full((2, 8), 8), 4)) == [0x88888888, 0x88888888]
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 8):
        q = torch.randint(0, 2**bits, (5, 64), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_rows(pack_rows(q, bits), bits, 64), q)


def test_gptq_tensors_with_g_idx():
    w = torch.randn(32, 96)
    qw = quantize_weight(w, 4, 64, True)  # ragged: groups of 64 and 32
    t = gptq_layer_tensors(qw, zero_offset=1, g_idx=True)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [0] * 64 + [1] * 32
    assert set(u32(t["qzeros"])) == {0x77777777}
    assert t["qweight"].shape == (96 * 4 // 32, 32) and t["scales"].shape == (2, 32)


# --- formats end to end on a tiny model ----------------------------------------------------------------


def test_auto_round_awq_packing(tmp_path):
    ar, (out,) = run(tmp_path, "auto_round", scheme="W4A16", sym=False, group_size=32)
    cfg = qconfig(out)
    assert cfg["quant_method"] == "auto-round" and cfg["packing_format"] == "auto_round:auto_awq"
    t = tensors(out)
    qw = t["model.layers.0.self_attn.q_proj.qweight"]
    assert qw.shape == (64, 64 // 8) and t["model.layers.0.self_attn.q_proj.qzeros"].shape == (2, 8)
    # the packed integers are the layer's integers, interleaved
    layer = ar.layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(unpack_awq_qweight(qw), layer.weight.qweight)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.model.layers[0].self_attn.q_proj.kernel_name.endswith("awq")  # a kernel for the AWQ layout
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_auto_round_asym_8bit_stays_raw_zp(tmp_path):
    _, (out,) = run(tmp_path, "auto_round", bits=8, sym=False, group_size=32)
    assert qconfig(out)["packing_format"] == "auto_round"


def test_auto_gptq(tmp_path):
    ar, (out,) = run(
        tmp_path, "auto_gptq", group_size=32,
        layer_config={"mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16}},
    )
    cfg = qconfig(out)
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is False
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["sym"] is True and cfg["lm_head"] is False
    assert cfg["dynamic"][r"+:^model\.layers\.0\.mlp\.down_proj$"] == {"bits": 8}
    assert cfg["dynamic"][r"-:^model\.layers\.1\.self_attn\.o_proj$"] == {}
    assert json.load(open(os.path.join(out, "quantize_config.json"))) == cfg
    t = tensors(out)
    assert t["model.layers.0.self_attn.q_proj.g_idx"].tolist() == [i // 32 for i in range(64)]
    assert "model.layers.1.self_attn.o_proj.weight" in t
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(), dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, TorchQuantLinear)
    assert loaded.model.layers[0].mlp.down_proj.bits == 8
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_gptq_act_order_g_idx_refused(tmp_path):
    _, (out,) = run(tmp_path, "auto_gptq", group_size=32)
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.g_idx"] = sd["model.layers.0.mlp.up_proj.g_idx"].flip(0).contiguous()
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    from autoround.quantizer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="up_proj.g_idx is not the plain i // group_size order"):
        AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(), dtype=torch.float32)


def test_auto_awq(tmp_path):
    ar, (out,) = run(tmp_path, "auto_awq", sym=False, group_size=32, layer_config={"mlp.down_proj": {"bits": 16}})
    cfg = qconfig(out)
    assert cfg == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
        "provider": "autoround",
    }
    t = tensors(out)
    layer = ar.layers["model.layers.1.mlp.up_proj"]
    assert torch.equal(unpack_awq(t["model.layers.1.mlp.up_proj.qzeros"]).t().int(), layer.weight.zero)
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(), dtype=torch.float32)
    assert loaded.model.layers[0].mlp.up_proj.kernel_name.endswith("awq")  # a kernel for the AWQ layout
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_auto_awq_refuses_mixed_schemes(tmp_path):
    ar = AutoRound(tiny_llama(), sym=False, group_size=32, iters=0, disable_opt_rtn=True,
                   layer_config={"self_attn.q_proj": {"group_size": -1}})
    with pytest.raises(FormatError, match="'auto_awq' holds one scheme.*auto_round or auto_gptq"):
        ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_awq")
    assert not ar.quantized


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, -1, False), (8, 32, False), (8, -1, True)])
def test_llm_compressor_through_compressed_tensors(tmp_path, bits, group_size, sym):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is installed by the [test] extra")
    ar, (out,) = run(tmp_path, "llm_compressor", bits=bits, group_size=group_size, sym=sym)
    cfg = qconfig(out)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    (group,) = cfg["config_groups"].values()
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] is sym
    assert group["weights"]["strategy"] == ("group" if group_size > 0 else "channel")
    assert cfg["ignore"] == ["lm_head"]
    t = tensors(out)
    name = "model.layers.0.mlp.gate_proj"
    assert t[f"{name}.weight_packed"].shape == (160, 64 * bits // 32)
    assert t[f"{name}.weight_shape"].tolist() == [160, 64]
    assert (f"{name}.weight_zero_point" in t) is (not sym)
    # bit-exact against compressed-tensors' own packer, fed with the signed integers it would quantize to
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    layer = ar.layers[name].weight
    signed = (layer.qweight.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, bits), t[f"{name}.weight_packed"])
    if not sym:
        zp = (layer.zero.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_to_int32(zp, bits, packed_dim=0), t[f"{name}.weight_zero_point"])
    if sym:  # compressed-tensors' quantizer, modules kept compressed and decompressed on the fly
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert hasattr(loaded.model.layers[0].mlp.gate_proj, "quantization_scheme")
    else:
        # transformers' compressed (meta-shape) path cannot take asymmetric packed zero points (known reader
        # limitation, llm-compressor issue 1618); its dequantize-at-load path reads them
        from transformers import CompressedTensorsConfig

        loaded = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_fake(tmp_path):
    ar, (out,) = run(tmp_path, "fake", group_size=32, bits=3)
    assert qconfig(out) is None
    t = tensors(out)
    w = t["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w, ar.model.model.layers[0].mlp.up_proj.weight.data)
    assert len(torch.unique(w[0, :32])) <= 8  # 3-bit: at most 8 levels in a group
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-5)


# --- several formats from one run, the matrix, incompatible pairs --------------------------------------


def test_multi_format_one_pass(tmp_path):
    ar, folders = run(tmp_path, "auto_gptq,auto_awq,auto_round,fake", sym=False, group_size=32)
    assert [os.path.basename(f) for f in folders] == ["auto_gptq", "auto_awq", "auto_round", "fake"]
    ref = logits(ar.model)
    assert qconfig(folders[2])["packing_format"] == "auto_round:auto_awq"
    for folder in folders:
        loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=AutoRoundConfig(),
                                                      dtype=torch.float32) if "fake" not in folder else \
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert torch.allclose(logits(loaded), ref, atol=1e-4), folder


def test_incompatible_pair_fails_before_tuning(tmp_path):
    ar = AutoRound(tiny_llama(), bits=3, group_size=32, iters=0, disable_opt_rtn=True)
    with pytest.raises(SchemeError, match=r"'auto_awq' cannot store .*4-bit.*formats that can hold W3A16 .*: "
                                          r"auto_round, auto_round:auto_gptq, auto_gptq"):
        ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round,auto_awq")
    assert not ar.quantized and not (tmp_path / "ckpt").exists()


def test_format_matrix():
    from autoround.quantizer.cli import _list

    text = _list("format")
    for name in ("auto_round", "auto_gptq", "auto_awq", "llm_compressor", "fake"):
        assert name in list_formats() and name in text
    from autoround.quantizer.schemes import PRESETS

    assert "auto_awq" not in formats_supporting(PRESETS["W3A16"])
    assert "llm_compressor" in formats_supporting(PRESETS["W8A16"])
    assert "llm_compressor" not in formats_supporting(PRESETS["W2A16"])
    row = next(line for line in text.splitlines() if line.strip().startswith("W3A16"))
    header = next(line for line in text.splitlines() if line.split()[:2] == ["scheme", "auto_round"])
    cells = dict(zip(header.split()[1:], row.split()[1:]))
    assert cells["auto_round"] == "yes" and cells["auto_awq"] == "no" and cells["fake"] == "yes"


# --- lm_head ------------------------------------------------------------------------------------------


def test_quant_lm_head_auto_round(tmp_path):
    ar, (out,) = run(tmp_path, "auto_round", group_size=32, quant_lm_head=True)
    cfg = qconfig(out)
    assert cfg["extra_config"]["lm_head"] == {"bits": 4, "group_size": 32, "sym": True, "data_type": "int"}
    assert "lm_head.qweight" in tensors(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.lm_head, TorchQuantLinear)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_quant_lm_head_tied(tmp_path):
    model = tied_model()
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(FormatError, match="ties lm_head.*'auto_gptq' cannot hold.*use one of: auto_round"):
        AutoRound(model, group_size=32, iters=0, quant_lm_head=True, disable_opt_rtn=True).quantize_and_save(
            str(tmp_path / "x"), format="auto_gptq")
    with pytest.raises(FormatError, match="'auto_awq' cannot hold a quantized lm_head"):
        AutoRound(model, group_size=32, sym=False, iters=0, quant_lm_head=True,
                  disable_opt_rtn=True).quantize_and_save(str(tmp_path / "x"), format="auto_awq")
    ar, (out,) = run(tmp_path, "auto_round", model=model, group_size=32, quant_lm_head=True)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the embedding stays float
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_registered_formats_follow_protocol():
    for name in ("auto_round", "auto_gptq", "auto_awq", "llm_compressor", "fake"):
        fmt = get_format(name)
        for attr in ("lm_head", "tied_lm_head", "uniform", "description"):
            assert hasattr(fmt, attr), (name, attr)


def test_cli_several_formats_and_incompatible_pair(tmp_path):
    from autoround.quantizer.cli import main

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--format", "auto_gptq,llm_compressor,fake", "--iters", "0",
                 "--disable_opt_rtn", "--group_size", "32", "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["auto_gptq", "fake", "llm_compressor"]
    assert qconfig(out / "auto_gptq")["quant_method"] == "gptq"
    assert qconfig(out / "llm_compressor")["quant_method"] == "compressed-tensors"
    bad = tmp_path / "bad"
    assert main(["--model", str(folder), "--format", "llm_compressor", "--bits", "3", "--iters", "0",
                 "--output_dir", str(bad)]) == 2
    assert not bad.exists()


def test_saving_to_a_format_that_cannot_pack_a_quantized_layer_fails(tmp_path):
    # hidden 96 with group 64 is ragged: auto_round packs it, auto_awq needs whole groups
    ar = AutoRound(tiny_llama(hidden=96, inter=192), sym=False, group_size=64, iters=0, disable_opt_rtn=True)
    ar.quantize("auto_round")
    with pytest.raises(FormatError, match="'auto_awq' cannot pack .* pass every format to quantize"):
        ar.save_quantized(str(tmp_path / "awq"), format="auto_awq")
    assert not (tmp_path / "awq").exists()


def test_layer_config_naming_lm_head_quantizes_it(tmp_path):
    model = tiny_llama()
    ar, (out,) = run(tmp_path, "auto_round", model=model, group_size=32, layer_config={"lm_head": {"bits": 8}})
    extra = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["extra_config"]
    assert extra["lm_head"]["bits"] == 8
    # a pattern that happens to match lm_head does not pull it in
    ar, (out,) = run(tmp_path / "p", "auto_round", model=tiny_llama(), group_size=32, layer_config={"head": {"bits": 8}})
    assert "lm_head" not in json.load(open(os.path.join(out, "config.json")))["quantization_config"].get("extra_config", {})


# --- plain RTN's rounding rule follows the format (``ExportFormat.rtn_rounding``) --------------------------------


def _int8_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 integers of ``w`` [out, in] for a per-row scale [out, 1] (full range, scale may be negative)."""
    return torch.clamp(torch.round(w / scale), -128, 127)


@pytest.mark.parametrize("route", ["in_memory", "model_free"])
def test_llm_compressor_rounds_plain_rtn_with_the_stored_scale(tmp_path, route):
    """INT8_W8A8 to llm_compressor: every int8 weight is the nearest integer for the fp16 scale the checkpoint
    stores, as the reference's export (compressed-tensors re-quantizes with it); the float32 scale's rule
    differs on some of them, so the test can tell the two apart."""
    from autoround.quantizer.qmath import ROUND_WITH_COMPUTED
    from autoround.quantizer.rtn import rtn_quantize

    model = tiny_llama(hidden=256, inter=512, layers=1)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("model.layers.0.")
               and isinstance(m, torch.nn.Linear)}
    if route == "model_free":
        model.save_pretrained(tmp_path / "src")
        model = str(tmp_path / "src")
    _, (out,) = run(tmp_path, "llm_compressor", model=model, scheme="INT8_W8A8")
    t = tensors(out)
    moved = 0
    for name, w in weights.items():
        scale = t[f"{name}.weight_scale"].float()
        assert torch.equal(t[f"{name}.weight"].float(), _int8_rows(w, scale)), name
        computed = rtn_quantize(w, 8, -1, True, ROUND_WITH_COMPUTED)
        moved += int((computed.qweight.float() - 128 != t[f"{name}.weight"].float()).sum())
    assert moved > 0  # the two rules differ here, so the equality above tells them apart


def test_a_format_written_after_quantize_with_another_rounding_rule_is_warned_about(tmp_path, caplog):
    """quantize() plans for the default format (auto_round: float32-scale rounding); writing llm_compressor after
    it warns, naming both rules and the fix; quantize(formats=...) for it does not warn."""
    import logging

    with caplog.at_level(logging.WARNING, logger="autoround"):
        ar = AutoRound(tiny_llama(), scheme="W8A16", group_size=-1, iters=0, disable_opt_rtn=True)
        ar.quantize()
        ar.save_quantized(str(tmp_path / "a"), format="llm_compressor")
    assert "with the computed scale" in caplog.text and "llm_compressor rounds with the stored scale" in caplog.text
    assert "Pass format='llm_compressor' to quantize()" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoround"):
        ar = AutoRound(tiny_llama(), scheme="W8A16", group_size=-1, iters=0, disable_opt_rtn=True)
        ar.quantize("llm_compressor")
        ar.save_quantized(str(tmp_path / "b"), format="llm_compressor")
        calib = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        ar2 = AutoRound(tiny_llama(), scheme="W8A16", group_size=-1, iters=0,  # optimized RTN: no rule involved
                        dataset=calib, nsamples=4, seqlen=16, batch_size=2)
        ar2.quantize()
        ar2.save_quantized(str(tmp_path / "c"), format="llm_compressor")
    assert "plain RTN rounded" not in caplog.text


def test_auto_round_keeps_the_float32_rounding_and_plan_names_the_rule(tmp_path):
    """auto_round keeps the float32-scale rule (the reference's default plain-RTN auto_round checkpoints);
    the plan carries the first format's rule."""
    from autoround.quantizer.qmath import ROUND_WITH_COMPUTED, ROUND_WITH_STORED
    from autoround.quantizer.rtn import rtn_quantize

    model = tiny_llama(hidden=256, inter=512, layers=1)
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    ar, _ = run(tmp_path, "auto_round", model=model, scheme="W8A16", group_size=-1)
    assert ar.plan.rtn_rounding == ROUND_WITH_COMPUTED
    got = ar.layers[name].weight.qweight
    assert torch.equal(got, rtn_quantize(w, 8, -1, True, ROUND_WITH_COMPUTED).qweight)
    assert not torch.equal(got, rtn_quantize(w, 8, -1, True, ROUND_WITH_STORED).qweight)
    assert get_format("llm_compressor").rtn_rounding == ROUND_WITH_STORED
