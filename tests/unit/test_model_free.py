"""The model-free RTN route (plain RTN of a local folder, streamed tensor by tensor without loading the model)
writes the same checkpoint as the in-memory route: same tensor names, dtypes and bits, same configs."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from autoround import AutoRound
from autoround.quantizer import model_free
from autoround.quantizer.errors import SchemeError
from autoround.quantizer.formats.writer import write_safetensors

from arhelpers import tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return str(folder)


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, k
                out[k] = h.get_tensor(k)
    return out


def side_files(folder):
    """Every file but the weights (configs, tokenizer), parsed when JSON."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            continue
        out[f.name] = json.loads(f.read_text()) if f.suffix == ".json" else f.read_bytes()
    return out


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].reshape(-1).view(torch.uint8), tb[name].reshape(-1).view(torch.uint8)), name
    assert side_files(a) == side_files(b)


def both_routes(folder, tmp_path, fmt="auto_round", **kw):
    """(model-free folder, in-memory folder, model-free AutoRound)."""
    kw.setdefault("iters", 0)
    kw.setdefault("disable_opt_rtn", True)
    mf = AutoRound(folder, **kw)
    model, (a,) = mf.quantize_and_save(str(tmp_path / "model_free"), format=fmt)
    assert model is None and not mf.pipeline.loaded  # the model was never loaded
    ref = AutoRound(folder, disable_model_free=True, **kw)
    assert ref.pipeline.loaded
    _, (b,) = ref.quantize_and_save(str(tmp_path / "in_memory"), format=fmt)
    return a, b, mf


def logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("auto_round", {"group_size": 32}),
        ("auto_round", {"group_size": 32, "sym": False}),
        ("auto_gptq", {"group_size": 32}),
        ("auto_gptq", {"group_size": 32, "sym": False}),
        ("auto_awq", {"group_size": 32, "sym": False}),
        ("llm_compressor", {"group_size": 32}),
    ],
)
def test_same_checkpoint_as_in_memory(tmp_path, fmt, kw):
    folder = save(tiny_llama(), tmp_path / "src")
    a, b, _ = both_routes(folder, tmp_path, fmt, **kw)
    assert_same_checkpoint(a, b)


def test_model_free_auto_gptq_rounds_each_layer_once_and_counts_wrapped_zero_points(tmp_path, monkeypatch, caplog):
    """Asymmetric auto_gptq on the model-free route: the zero-point-0 warning is counted as each layer is packed, so
    every layer's weight is rounded once (it is rounded each time it is asked for), and the count is the in-memory
    route's."""
    import logging
    import re

    model = tiny_llama()
    with torch.no_grad():  # rows of non-negative weights: their groups' zero point is 0
        model.model.layers[0].mlp.down_proj.weight[:4].abs_()
    folder = save(model, tmp_path / "src")
    calls = []
    real = model_free.rtn_quantize
    monkeypatch.setattr(model_free, "rtn_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = []
    for disable in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="autoround"):
            ar = AutoRound(folder, scheme="W2A16", group_size=32, sym=False, iters=0, disable_opt_rtn=True,
                           disable_model_free=disable)
            ar.quantize_and_save(str(tmp_path / f"out{disable}"), format="auto_gptq")
        found = re.search(r"auto_gptq: (\d+) asymmetric groups have zero point 0", caplog.text)
        counts.append(int(found.group(1)) if found else 0)
        if not disable:
            assert len(calls) == 14  # 2 blocks x 7 layers, each rounded once
    assert counts[0] == counts[1] >= 4 * 160 // 32


def test_mixed_layer_config_and_float_layer(tmp_path):
    folder = save(tiny_llama(), tmp_path / "src")
    layer_config = {"mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16},
                    r"layers\.0\.self_attn\.[kv]_proj": {"group_size": -1}}
    a, b, mf = both_routes(folder, tmp_path, group_size=32, layer_config=layer_config, ignore_layers="up_proj")
    assert "model.layers.1.self_attn.o_proj" in mf.plan.keep_float and "model.layers.0.mlp.up_proj" in mf.plan.keep_float
    extra = json.load(open(os.path.join(a, "config.json")))["quantization_config"]["extra_config"]
    assert extra["model.layers.0.mlp.down_proj"] == {"bits": 8}
    assert_same_checkpoint(a, b)
    assert torch.equal(logits(a), logits(b))


def test_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = save(LlamaForCausalLM(cfg).eval(), tmp_path / "src")
    assert "lm_head.weight" not in load_file(os.path.join(folder, "model.safetensors"))
    a, b, _ = both_routes(folder, tmp_path, group_size=32)
    assert "lm_head.weight" not in tensors(a) and "model.embed_tokens.weight" in tensors(a)
    assert_same_checkpoint(a, b)
    assert torch.equal(logits(a), logits(b))


def test_sharded_source_and_sharded_output(tmp_path, monkeypatch):
    folder = save(tiny_llama(), tmp_path / "src", max_shard_size="100KB")
    assert (Path(folder) / "model.safetensors.index.json").exists()
    monkeypatch.setattr(model_free, "DEFAULT_MAX_SHARD_BYTES", 64 * 1024)
    a, b, _ = both_routes(folder, tmp_path, group_size=32)
    index = json.load(open(os.path.join(a, "model.safetensors.index.json")))
    shards = sorted(p.name for p in Path(a).glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not [p for p in Path(a).iterdir() if p.name.startswith(".")]
    assert_same_checkpoint(a, b)
    assert torch.equal(logits(a), logits(b))


def test_gpt2_conv1d_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    folder = save(GPT2LMHeadModel(cfg).eval(), tmp_path / "src")
    a, b, mf = both_routes(folder, tmp_path, group_size=32)
    assert "transformer.h.0.attn.c_attn" in mf.plan.quantize
    assert_same_checkpoint(a, b)


def test_disable_model_free_and_lazy_model(tmp_path):
    folder = save(tiny_llama(), tmp_path / "src")
    forced = AutoRound(folder, iters=0, disable_opt_rtn=True, disable_model_free=True)
    assert forced.pipeline.loaded
    lazy = AutoRound(folder, iters=0, disable_opt_rtn=True)
    assert not lazy.pipeline.loaded
    assert lazy.tokenizer is None and not lazy.pipeline.loaded  # the tokenizer alone loads no model
    assert isinstance(lazy.model, torch.nn.Module)  # loaded on first use
    model, (out,) = lazy.quantize_and_save(str(tmp_path / "out"))
    assert model is lazy.model and lazy.quantized  # the model was loaded: the in-memory route
    _, (ref,) = forced.quantize_and_save(str(tmp_path / "ref"))
    assert_same_checkpoint(out, ref)


def test_quantize_without_save_uses_the_model(tmp_path):
    folder = save(tiny_llama(), tmp_path / "src")
    ar = AutoRound(folder, iters=0, disable_opt_rtn=True, group_size=32)
    model, layer_config = ar.quantize()
    assert model is ar.model and len(layer_config) == 14


def test_declined_models_and_formats_fall_back(tmp_path):
    model = tiny_llama()
    folder = save(model, tmp_path / "src")
    # a format written from the loaded model
    ar = AutoRound(folder, iters=0, disable_opt_rtn=True, group_size=32)
    ar.quantize_and_save(str(tmp_path / "fake"), format="fake")
    assert ar.pipeline.streamed_to == [str(tmp_path / "fake")]  # streamed tuning's route, block by block
    # a tensor the model has no place for: transformers drops it, the route declines rather than guess
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights["model.unexpected"] = torch.zeros(3)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(model_free.Declined, match="model.unexpected"):
        model_free.open_model(folder)
    ar = AutoRound(folder, iters=0, disable_opt_rtn=True, group_size=32)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "out"))
    assert ar.pipeline.loaded
    assert "model.layers.0.mlp.up_proj.qweight" in tensors(out)


def test_same_errors_before_any_work(tmp_path):
    folder = save(tiny_llama(), tmp_path / "src")
    ar = AutoRound(folder, iters=0, disable_opt_rtn=True, bits=5)
    with pytest.raises(SchemeError, match="5-bit weights cannot be packed"):
        ar.quantize_and_save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not ar.pipeline.loaded


def test_write_safetensors_shards_incrementally(tmp_path):
    items = [(f"t{i}", torch.full((256,), float(i))) for i in range(5)]  # 1 KiB each
    write_safetensors(tmp_path, iter(items), max_shard_bytes=2048)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    got = {}
    for f in tmp_path.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert all(torch.equal(got[n], t) for n, t in items)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 5 * 1024


def test_streamed_shard_every_dtype_reads_back(tmp_path):
    """The tensor-by-tensor writer produces files the safetensors library (and so transformers) reads: every
    dtype a checkpoint holds, a scalar, an empty tensor and a non-contiguous one, values bit for bit."""
    from safetensors import safe_open

    items = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i32": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32), "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "i64": torch.arange(3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6).t(),
    }
    write_safetensors(tmp_path, iter(items.items()), max_shard_bytes=2**20)
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(items)
    for name, t in items.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".*"))  # no scratch files left


def test_cli_takes_the_route(tmp_path, caplog):
    from autoround.quantizer.cli import main

    folder = save(tiny_llama(), tmp_path / "src")
    common = ["--model", folder, "--iters", "0", "--disable_opt_rtn", "--group_size", "32"]
    assert main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    assert "model-free route" in caplog.text
    caplog.clear()
    assert main([*common, "--disable_model_free", "--output_dir", str(tmp_path / "b")]) == 0
    assert "in-memory route (disable_model_free=True)" in caplog.text and "model-free route" not in caplog.text
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_smollm2_same_checkpoint(tmp_path, smollm2_folder):
    a, b, _ = both_routes(str(smollm2_folder), tmp_path, group_size=64)
    assert "tokenizer.json" in side_files(a) and "generation_config.json" in side_files(a)
    assert_same_checkpoint(a, b)
