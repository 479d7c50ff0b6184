"""Hadamard rotation (``rotation_config``): the matrices, the transform keeping the float model's outputs, the
tuned and exported model, our loader applying the rotation, and the refusals before work."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from autoround import AutoRound
from autoround.quantizer.errors import AutoRoundError, FormatError
from autoround.quantizer.transforms.rotation import RotationSpec, hadamard, hadamard_order_error, rotation_of

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
DATA = dict(dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# --- matrices -------------------------------------------------------------------------------------------------


def test_sylvester_for_powers_of_two():
    h = hadamard(8)
    h4 = hadamard(4)
    assert torch.equal(h, torch.cat([torch.cat([h4, h4], 1), torch.cat([h4, -h4], 1)], 0))
    assert h[0].tolist() == [1] * 8 and h[:, 0].tolist() == [1] * 8


@pytest.mark.parametrize("n", [12, 20, 24, 28, 36, 40, 44, 48, 60, 72, 76, 96, 108, 140, 160, 192])
def test_non_power_of_two_orders_are_hadamard(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64))


def test_orders_without_a_construction_are_named():
    for n in (6, 10, 52, 92):
        assert hadamard_order_error(n) is not None
    with pytest.raises(AutoRoundError, match="block_size=52"):
        RotationSpec(block_size=52)


def test_random_hadamard_depends_on_the_seed_and_is_orthonormal():
    a = RotationSpec("random_hadamard", 32, 1).matrix()
    b = RotationSpec("random_hadamard", 32, 1).matrix()
    c = RotationSpec("random_hadamard", 32, 2).matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(32, dtype=torch.float64), atol=1e-12)


def test_parse_spellings():
    assert RotationSpec.parse(None) is None and RotationSpec.parse({}) is None
    assert RotationSpec.parse("default") == RotationSpec("hadamard", 32, 0)
    assert RotationSpec.parse({"hadamard_type": "random_hadamard", "block_size": 16, "seed": 7}) == \
        RotationSpec("random_hadamard", 16, 7)
    # a checkpoint's record (the reference's keys) parses back to the same rotation
    spec = RotationSpec("random_hadamard", 64, 3)
    assert RotationSpec.parse(spec.record()) == spec
    # the residual fold rotates down_proj's input online unless allow_online_rotation=False (the reference's default)
    folded = RotationSpec.parse({"backend": "inplace", "allow_online_rotation": False})
    assert folded.mode == "residual" and not folded.online_down
    assert RotationSpec.parse({"backend": "inplace"}).online_down
    assert RotationSpec.parse({"hadamard_type": "inplace_hadamard"}).online_down
    assert not RotationSpec.parse("default").online_down
    with pytest.raises(AutoRoundError, match="allow_online_rotation=False"):
        RotationSpec.parse({"allow_online_rotation": False})
    for bad, what in [("quarot", "not known"), ({"hadamard_type": "quarot_hadamard"}, "not built"),
                      ({"block_size": 32, "colour": 1}, "not known"), ({"backend": "spin"}, "inplace"),
                      ({"block_size": 0}, ">= 2")]:
        with pytest.raises(AutoRoundError, match=what):
            RotationSpec.parse(bad)


# --- the transform and the quantized model --------------------------------------------------------------------


def test_rotation_keeps_the_float_model_and_rotates_weights():
    m = tiny_llama(hidden=64, inter=128)
    ref = _logits(m)
    before = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    ar = AutoRound(m, scheme="MXFP4", rotation_config="default", iters=0)
    ar.pipeline.transform()
    assert torch.allclose(_logits(ar.model), ref, atol=1e-4)
    layer = ar.model.model.layers[0].mlp.down_proj
    assert rotation_of(layer) is not None and rotation_of(ar.model.lm_head) is None
    assert not torch.allclose(layer.weight, before)
    # W_rot = W Rᵀ per block of 32 input features
    r = RotationSpec().matrix().float()
    assert torch.allclose(layer.weight[:, :32], before[:, :32] @ r.T, atol=1e-6)


@pytest.mark.parametrize("scheme,iters", [("MXFP4", 0), ("W4A16", 0), ("W4A16", 2), ("NVFP4", 2)])
def test_rotated_export_loads_with_the_same_logits(tmp_path, scheme, iters):
    """auto_round records rotation_config, the weights stay rotated, and our loader rotates each quantized layer's
    input: its logits equal the rotated fake-quantized model's."""
    from autoround import AutoRoundConfig  # noqa: F401  (registers the loader)

    m = tiny_llama(hidden=64, inter=128)
    ar = AutoRound(m, scheme=scheme, rotation_config="default", iters=iters, dataset=CALIB, nsamples=8, seqlen=32,
                   batch_size=4, group_size=None if scheme != "W4A16" else 32)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["rotation_config"]["hadamard_type"] == "hadamard" and cfg["rotation_config"]["block_size"] == 32
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rotation_of(loaded.get_submodule("model.layers.0.self_attn.q_proj")) is not None
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


def test_rotation_lowers_mxfp4_error_on_outlier_weights():
    """Outlier input channels: the rotation spreads each over its block, so MXFP4 RTN of the rotated layer
    reconstructs the float output better."""
    m = tiny_llama(hidden=128, inter=256)
    ref = _logits(m)
    with torch.no_grad():
        for layer in m.model.layers:
            for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
                lin.weight[:, ::37] *= 12.0
    ref = _logits(m)

    def err(rotation):
        mm = tiny_llama(hidden=128, inter=256)
        mm.load_state_dict(m.state_dict())
        ar = AutoRound(mm, scheme="MXFP4", act_bits=16, iters=0, disable_opt_rtn=True, rotation_config=rotation)
        model, _ = ar.quantize()
        return (_logits(model) - ref).pow(2).mean().item()

    assert err("default") < 0.8 * err(None)


def test_random_hadamard_stores_each_layers_matrix(tmp_path):
    from autoround import AutoRoundConfig  # noqa: F401

    m = tiny_llama(hidden=64, inter=128)
    ar = AutoRound(m, scheme="MXFP4", iters=0, rotation_config={"hadamard_type": "random_hadamard", "seed": 5}, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    name = "model.layers.1.mlp.up_proj"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        stored = f.get_tensor(f"{name}.hadamard_matrix")
    assert torch.equal(stored, RotationSpec("random_hadamard", 32, 5).matrix().float())
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["rotation_config"]["seed"] == 5
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


def test_fake_export_folds_the_rotation_back(tmp_path):
    """fake writes W = W_rot R per block: a plain float checkpoint whose logits equal the rotated model's (float
    activations: fake records no activation quantization)."""
    m = tiny_llama(hidden=64, inter=128)
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, rotation_config="default", **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "fake"), format="fake")
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logits(plain), _logits(ar.model), atol=1e-5, rtol=1e-5)


def test_layers_kept_float_are_not_rotated(tmp_path):
    from autoround import AutoRoundConfig  # noqa: F401

    m = tiny_llama(hidden=64, inter=128)
    original = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, rotation_config="default",
                   layer_config={"model.layers.0.mlp.down_proj": {"bits": 16}}, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    kept = ar.model.model.layers[0].mlp.down_proj
    assert rotation_of(kept) is None and torch.allclose(kept.weight, original, atol=1e-6)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rotation_of(loaded.model.layers[0].mlp.down_proj) is None
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


# --- refusals before work ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["llm_compressor", "auto_gptq", "gguf:q4_0", "auto_awq"])
def test_formats_that_cannot_carry_the_rotation_refuse_before_work(tmp_path, fmt):
    m = tiny_llama(hidden=64, inter=128)
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=2, rotation_config="default", dataset=CALIB,
                   nsamples=8, seqlen=32)
    with pytest.raises(AutoRoundError, match="cannot carry the online input rotation"):
        ar.quantize_and_save(str(tmp_path / "out"), format=fmt)
    assert not os.path.exists(tmp_path / "out") and not ar.pipeline.quantized


def test_block_size_that_does_not_divide_a_layer_is_refused(tmp_path):
    m = tiny_llama(hidden=64, inter=160)  # down_proj has 160 input features
    ar = AutoRound(m, scheme="MXFP4", iters=0, rotation_config={"block_size": 64}, **DATA)
    with pytest.raises(AutoRoundError, match="does not divide the input features of 2 layer"):
        ar.quantize_and_save(str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_bad_rotation_config_fails_at_construction():
    with pytest.raises(AutoRoundError, match="hadamard_type"):
        AutoRound(tiny_llama(), scheme="MXFP4", rotation_config={"hadamard_type": "quarot_hadamard"})


def test_engines_refuse_rotated_checkpoints():
    from autoround.engine_common import parse_checkpoint_config

    cfg = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True,
           "packing_format": "auto_round:auto_gptq", "rotation_config": RotationSpec().record()}
    with pytest.raises(AutoRoundError, match="does not apply"):
        parse_checkpoint_config(cfg)


def test_gpt2_conv1d_layers_keep_rotation_and_activation_quantization(tmp_path):
    """GPT-2's Conv1D layers are quantized as linears and restored afterwards: the restored layers keep their input
    rotation and activation quantization, and the checkpoint loads with the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from autoround import AutoRoundConfig  # noqa: F401

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    ar = AutoRound(m, scheme="MXFP4", iters=0, rotation_config="default", **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    assert rotation_of(ar.model.transformer.h[0].mlp.c_fc) is not None
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


# --- residual-stream rotation folded into the weights (backend "inplace") -----------------------------------------


def test_residual_rotation_folds_into_an_ordinary_checkpoint(tmp_path):
    """backend='inplace': the folded float model computes what it did; the quantized model is written as an ordinary
    checkpoint with no rotation_config, which even llm_compressor / auto_gptq can hold, and loads back equal."""
    from autoround import AutoRoundConfig  # noqa: F401

    m = tiny_llama(hidden=64, inter=128)
    ref = _logits(m)
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=2,
                   rotation_config={"backend": "inplace", "allow_online_rotation": False}, **DATA)
    ar.pipeline.transform()
    assert torch.allclose(_logits(ar.model), ref, atol=1e-4)
    assert torch.equal(ar.model.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert all(rotation_of(m) is None for m in ar.model.modules())  # nothing online
    _, folders = ar.quantize_and_save(str(tmp_path / "out"), format="auto_round,auto_gptq")
    for folder in folders:
        cfg = json.load(open(os.path.join(folder, "config.json")))
        assert "rotation_config" not in cfg["quantization_config"] and cfg["tie_word_embeddings"] is False
        kw = {"quantization_config": AutoRoundConfig()} if folder.endswith("auto_gptq") else {}
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
        assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-4, rtol=1e-4)


def test_residual_rotation_unties_a_tied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    ref = _logits(m)
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, rotation_config={"backend": "inplace"}, **DATA)
    ar.pipeline.transform()
    assert ar.model.lm_head.weight is not ar.model.model.embed_tokens.weight
    assert torch.allclose(_logits(ar.model), ref, atol=1e-4)


def test_residual_rotation_refuses_other_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, rotation_config={"backend": "inplace"}, **DATA)
    with pytest.raises(AutoRoundError, match="cannot fold into this model: model type 'gpt2'"):
        ar.quantize()


def test_residual_rotation_rotates_down_proj_online_by_default_and_only_fake_holds_it(tmp_path):
    """backend='inplace' with allow_online_rotation left True (the reference's default): down_proj's input is also
    rotated online (QuaRot's step), the float model still computes what it did; formats that cannot carry it refuse
    before work, quantize() in memory works, and fake writes each down_proj rotated back, an ordinary checkpoint."""
    m = tiny_llama(hidden=64, inter=128)
    ref = _logits(m)
    cfg = {"backend": "inplace"}
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True, rotation_config=cfg, **DATA)
    with pytest.raises(FormatError, match="cannot carry the online down_proj rotation.*allow_online_rotation=False"):
        ar.quantize_and_save(str(tmp_path / "no"), format="auto_round")
    assert not ar.layers and not os.path.exists(tmp_path / "no")
    ar = AutoRound(tiny_llama(hidden=64, inter=128), scheme="W4A16", group_size=32, iters=2, rotation_config=cfg,
                   **DATA)
    ar.pipeline.transform()
    assert torch.allclose(_logits(ar.model), ref, atol=1e-4)
    rotated = [n for n, mod in ar.model.named_modules() if rotation_of(mod) is not None]
    assert rotated == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    ar.quantize()  # in memory: the default format only plans
    with pytest.raises(FormatError, match="cannot carry the online down_proj rotation"):
        ar.save_quantized(str(tmp_path / "ar"), format="auto_round")
    (out,) = ar.save_quantized(str(tmp_path / "fake"), format="fake")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(rotation_of(mod) is None for mod in plain.modules())
    assert torch.allclose(_logits(plain), _logits(ar.model), atol=1e-4, rtol=1e-4)
    assert "rotation_config" not in json.load(open(os.path.join(out, "config.json"))).get("quantization_config", {})


def test_online_down_proj_rotation_is_undone_on_a_down_proj_kept_float():
    runs = {}
    for online in (True, False):
        ar = AutoRound(tiny_llama(hidden=64, inter=128), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True,
                       rotation_config={"backend": "inplace", "allow_online_rotation": online},
                       layer_config={"model.layers.1.mlp.down_proj": {"bits": 16}}, **DATA)
        ar.quantize("fake")
        runs[online] = ar
    ar = runs[True]
    kept = ar.model.model.layers[1].mlp.down_proj
    assert rotation_of(kept) is None and rotation_of(ar.model.model.layers[0].mlp.down_proj) is not None
    assert "model.layers.1.mlp.down_proj" not in ar.layers
    assert ar.layers["model.layers.0.mlp.down_proj"].rotation is not None
    # the float layer holds the residual fold's weight alone, as without the online rotation
    assert torch.allclose(kept.weight, runs[False].model.model.layers[1].mlp.down_proj.weight, atol=1e-6)
