"""The ``mlx`` and ``auto_round:mlx`` formats on tiny models: MLX's bit order, the config mlx-lm reads, the
transformers load of ``auto_round:mlx`` against the fake-quantized model, and bad input before any work.
(mlx-lm itself reads these exports in tests/peer/test_mlx_lm.py, in its own virtualenv.)"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from autoround import AutoRound
from autoround.backends import TorchMlxQuantLinear
from autoround.quantizer.errors import AutoRoundError, SchemeError
from autoround.quantizer.formats import formats_supporting, get_format
from autoround.quantizer.formats.packing import mlx_layer_tensors, unpack_mlx_weight
from autoround.quantizer.qmath import QuantizedWeight
from autoround.quantizer.schemes import QuantScheme

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))

# 32 values (j * 7 + 3) mod 2**bits packed as MLX packs them: these words were checked with MLX 0.32.4
# (mx.dequantize with scale 1 and bias 0 returns the 32 values)
GOLDEN = {
    2: [0x1B1B1B1B, 0x1B1B1B1B],
    3: [0x53977053, 0x70539770, 0x97705397],
    4: [0x4D6F81A3, 0xC5E7092B, 0x4D6F81A3, 0xC5E7092B],
    5: [0x4DFC4543, 0x78245BA3, 0x0753617D, 0x4B276CF4, 0xE55C7066],
    6: [0x9F611283, 0x90BBD2D9, 0xB2579740, 0x8F201EB3, 0x9CAB91D5, 0x71538703],
    8: [0x18110A03, 0x342D261F, 0x5049423B, 0x6C655E57, 0x88817A73, 0xA49D968F, 0xC0B9B2AB, 0xDCD5CEC7],
}


def _weight(bits, values, scale=0.5, zero=None, group_size=32):
    q = torch.tensor([values], dtype=torch.uint8)
    groups = q.shape[1] // group_size
    zero = (1 << (bits - 1)) if zero is None else zero
    return QuantizedWeight(q, torch.full((1, groups), scale), torch.full((1, groups), zero, dtype=torch.int32),
                           bits, group_size, True)


@pytest.mark.parametrize("bits", sorted(GOLDEN))
def test_mlx_bit_order_is_pinned(bits):
    values = [(j * 7 + 3) % (1 << bits) for j in range(32)]
    t = mlx_layer_tensors(_weight(bits, values), torch.float32)
    assert t["weight"].dtype == torch.uint32 and t["weight"].shape == (1, bits)
    assert [w & 0xFFFFFFFF for w in t["weight"].view(torch.int32).tolist()[0]] == GOLDEN[bits]
    assert unpack_mlx_weight(t["weight"], bits, 32).tolist()[0] == values


def test_scales_and_biases_are_the_affine_form():
    values = list(range(16)) * 2
    t = mlx_layer_tensors(_weight(4, values, scale=0.25, zero=3), torch.float32)
    assert t["scales"].tolist() == [[0.25]] and t["biases"].tolist() == [[-0.75]]
    # symmetric: zero 2**(bits-1), a power of two, so float16 biases are exact too
    t16 = mlx_layer_tensors(_weight(4, values, scale=0.0123), torch.float16)
    assert t16["biases"].float().item() == -8 * torch.tensor(0.0123).half().float().item()


def quantize(tmp_path, fmt, model=None, **kw):
    kw.setdefault("iters", 0)
    kw.setdefault("disable_opt_rtn", True)
    ar = AutoRound(model or tiny_llama(), **kw)
    _, folders = ar.quantize_and_save(str(tmp_path / "out"), format=fmt)
    with torch.no_grad():
        fake = ar.model(IDS).logits
    return ar, folders, fake


@pytest.mark.parametrize("sym", [True, False])
def test_auto_round_mlx_loads_in_transformers_equal_to_fake(tmp_path, sym):
    layer_config = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16},
                    "model.layers.1.mlp.up_proj": {"bits": 2, "group_size": 64}}
    _, (ar_mlx, native), fake = quantize(tmp_path, "auto_round:mlx,mlx", bits=4, group_size=32, sym=sym,
                                         layer_config=layer_config)
    cfg = json.load(open(os.path.join(ar_mlx, "config.json")))
    q = cfg["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32 and q["mode"] == "affine"
    assert q["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 32}
    assert q["model.layers.1.mlp.up_proj"] == {"bits": 2, "group_size": 64}
    assert q["model.layers.1.self_attn.o_proj"] is False
    assert "model.layers.0.self_attn.q_proj" not in q  # the default needs no entry
    assert cfg["rope_theta"] == 10000.0  # mlx-lm reads it at the top level (transformers 5 nests it)
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "mlx" and qc["sym"] is sym
    assert qc["extra_config"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    native_cfg = json.load(open(os.path.join(native, "config.json")))
    assert native_cfg["quantization"] == q and native_cfg["quantization_config"] == q  # as mlx-lm writes it
    with safe_open(os.path.join(native, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert w.dtype == torch.uint32 and w.shape == (64, 64 * 4 // 32)
        # the tiny model is float32: scales and biases stay float32 (asymmetric zero points exact)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.biases").shape == (64, 2)
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.float32
    assert "model.layers.1.self_attn.o_proj.scales" not in names and "model.embed_tokens.weight" in names
    model = AutoModelForCausalLM.from_pretrained(ar_mlx, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, TorchMlxQuantLinear)
    assert not isinstance(model.model.layers[1].self_attn.o_proj, TorchMlxQuantLinear)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fake)


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_other_mlx_bits_round_trip(tmp_path, bits):
    _, (out,), fake = quantize(tmp_path, "auto_round:mlx", bits=bits, group_size=64)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bits == bits
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, fake, atol=1e-5)


def test_float16_checkpoint_gets_float16_scales(tmp_path):
    model = tiny_llama().to(torch.float16)
    _, (out,), _ = quantize(tmp_path, "mlx", model=model, bits=4, group_size=32)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.biases").dtype == torch.float16


def test_ragged_layers_stay_float_and_are_marked(tmp_path):
    # hidden 96: q/k/v/o and gate/up have 96 inputs, not whole groups of 64; down_proj (160 inputs) neither,
    # with group 32 every layer packs
    ar, (out,), fake = quantize(tmp_path, "mlx", model=tiny_llama(hidden=96, inter=128), bits=4, group_size=64)
    q = json.load(open(os.path.join(out, "config.json")))["quantization"]
    assert q["model.layers.0.self_attn.q_proj"] is False and "model.layers.0.mlp.down_proj" not in q
    assert set(ar.layers) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def test_lm_head_quantized_and_untied(tmp_path):
    _, (out,), fake = quantize(tmp_path, "auto_round:mlx", bits=4, group_size=32, quant_lm_head=True)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "lm_head" not in cfg["quantization"] and cfg["tie_word_embeddings"] is False  # the default scheme
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.uint32 and "lm_head.scales" in set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model.lm_head, TorchMlxQuantLinear)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fake)


@pytest.mark.parametrize("kw, message", [
    ({"bits": 4, "group_size": -1}, "groups of 32, 64, 128 input channels, not one group per output row"),
    ({"bits": 4, "group_size": 16}, "not group_size 16"),
    ({"bits": 7, "group_size": 32}, "MLX quantizes 2, 3, 4, 5, 6, 8-bit weights, not 7-bit"),
])
def test_unholdable_schemes_refused_before_work(tmp_path, kw, message):
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True, **kw)
    with pytest.raises((SchemeError, AutoRoundError), match=message):
        ar.quantize_and_save(str(tmp_path / "out"), format="mlx")
    assert not (tmp_path / "out").exists() and not ar.quantized


def test_formats_listed_with_their_schemes():
    assert {"mlx", "auto_round:mlx"} <= set(formats_supporting(QuantScheme(bits=4, group_size=64)))
    assert "mlx" not in formats_supporting(QuantScheme(bits=4, group_size=-1))
    assert get_format("auto_round:mlx").lm_head


def test_engines_refuse_mlx_packing():
    from autoround.engine_common import parse_checkpoint_config

    with pytest.raises(SchemeError, match="MLX's packing.*--format auto_round"):
        parse_checkpoint_config({"quant_method": "auto-round", "packing_format": "mlx", "bits": 4, "group_size": 64})
