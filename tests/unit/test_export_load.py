"""Quantize tiny config-built models, save auto_round checkpoints, load them back through transformers."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from autoround import AutoRound, AutoRoundConfig
from autoround.backends import TorchQuantLinear
from autoround.quantizer.errors import AutoRoundError, FormatError, ModelLoadError, OutputError, SchemeError

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def quantize(tmp_path, model=None, **kw):
    model = model or tiny_llama()
    kw.setdefault("iters", 0)
    kw.setdefault("disable_opt_rtn", True)
    ar = AutoRound(model, **kw)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    return ar, out


def test_round_trip_plain_and_with_config(tmp_path):
    ar, out = quantize(tmp_path, scheme="W4A16", group_size=32)
    fake = logits(ar.model)
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "auto-round" and cfg["packing_format"] == "auto_round:auto_gptq"
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["sym"] is True
    assert cfg["block_name_to_quantize"] == "model.layers"
    # a config-built model has no architectures list; engines (vLLM, SGLang) need one to pick the model class
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    assert json.load(open(os.path.join(out, "quantization_config.json"))) == cfg
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").shape == (64 * 4 // 32, 64)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        qz = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
        assert {x & 0xFFFFFFFF for x in qz.reshape(-1).tolist()} == {0x77777777}
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.layers.0.self_attn.q_proj.g_idx" not in keys
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(plain.model.layers[0].mlp.down_proj, TorchQuantLinear)
    assert torch.allclose(logits(plain), fake, atol=1e-4)
    with_cfg = AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(), dtype=torch.float32)
    assert torch.allclose(logits(with_cfg), fake, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bits(tmp_path, bits):
    ar, out = quantize(tmp_path, bits=bits, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_ragged_groups_and_asym(tmp_path):
    # hidden 96 with group 64: two groups per row, the last one has 32 channels
    model = tiny_llama(hidden=96, inter=192)
    ar, out = quantize(tmp_path, model=model, group_size=64, sym=False, disable_opt_rtn=False,
                       dataset=[torch.randint(0, 256, (32,)) for _ in range(4)], nsamples=4, seqlen=32)
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["packing_format"] == "auto_round" and cfg["sym"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.scales.shape == (2, 96)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_layer_config_mixed_bits_and_float(tmp_path):
    ar, out = quantize(
        tmp_path, group_size=32,
        layer_config={"mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16},
                      r"layers\.0\.self_attn\.[kv]_proj": {"group_size": -1}},
    )
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    extra = cfg["extra_config"]
    assert extra["model.layers.0.mlp.down_proj"] == {"bits": 8}
    assert extra["model.layers.1.self_attn.o_proj"]["bits"] == 16
    assert extra["model.layers.0.self_attn.k_proj"] == {"group_size": -1}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.model.layers[1].mlp.down_proj.bits == 8
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    assert loaded.model.layers[0].self_attn.k_proj.group_size == -1
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_unpackable_shapes_stay_float(tmp_path):
    model = tiny_llama(hidden=64, inter=100)  # 100 is not a multiple of 32
    ar, out = quantize(tmp_path, model=model, group_size=32)
    assert "model.layers.0.mlp.down_proj" in ar.plan.keep_float
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, torch.nn.Linear)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, TorchQuantLinear)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


def test_tied_embeddings_saved_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    ar, out = quantize(tmp_path, model=LlamaForCausalLM(cfg).eval(), group_size=32)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(ar.model), atol=1e-4)


# --- bad input: clear errors, no partial output -------------------------------------------------------


def no_partial(tmp_path):
    return [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name == "ckpt"] == []


def test_unknown_scheme(tmp_path):
    with pytest.raises(SchemeError, match="unknown scheme 'W5A17'; valid schemes"):
        AutoRound(tiny_llama(), scheme="W5A17", iters=0)


def test_bits5_rejected_by_gptq_layout_before_work(tmp_path):
    ar = AutoRound(tiny_llama(), bits=5, iters=0, disable_opt_rtn=True)
    with pytest.raises(SchemeError, match="5-bit weights cannot be packed in the GPTQ layout.*valid bits: 2, 3, 4, 8"):
        ar.quantize_and_save(str(tmp_path / "ckpt"))
    assert not ar.quantized and no_partial(tmp_path)


def test_bad_group_size():
    with pytest.raises(SchemeError, match="group_size=-3 is invalid; valid: -1"):
        AutoRound(tiny_llama(), group_size=-3, iters=0)


def test_unknown_format(tmp_path):
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)
    with pytest.raises(FormatError, match="unknown format 'gguf:q9'; valid formats: auto_round"):
        ar.quantize_and_save(str(tmp_path / "ckpt"), format="gguf:q9")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        AutoRound(str(tmp_path / "no-such-model"), iters=0)


def test_hub_id_offline_names_local_folder():
    with pytest.raises(ModelLoadError, match="pass its local folder instead"):
        AutoRound("some-org/some-model-that-is-not-cached", iters=0)


def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user that ignores permissions")  # pragma: no cover
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)
    with pytest.raises(OutputError, match="is not writable"):
        ar.quantize_and_save(str(locked / "out"))
    assert not ar.quantized


def test_unwritable_output_dir_as_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)
    with pytest.raises(OutputError, match="exists and is not a folder"):
        ar.quantize_and_save(str(blocker))
    with pytest.raises(OutputError, match="not writable|not a folder"):
        ar.quantize_and_save(str(blocker / "sub"))
    with pytest.raises(OutputError, match="/sys is not writable"):  # even root cannot write there
        ar.quantize_and_save("/sys/autoround-out")
    assert not ar.quantized


def test_corrupt_safetensors(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt or truncated"):
        AutoRound(str(folder), iters=0)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ar, out = quantize(tmp_path, group_size=32)
    before = sorted(os.listdir(out))
    import autoround.quantizer.formats.writer as writer

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ar.save_quantized(out)
    assert sorted(os.listdir(out)) == before
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # still a good checkpoint


def test_unknown_argument():
    with pytest.raises(TypeError, match="unknown argument.*'itres'"):
        AutoRound(tiny_llama(), itres=0)


def test_loader_reports_missing_tensors(tmp_path):
    _, out = quantize(tmp_path, group_size=32)
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.scales"]
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing quantized tensors: model.layers.1.mlp.up_proj.scales"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
