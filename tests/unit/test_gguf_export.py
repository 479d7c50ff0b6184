"""GGUF export on tiny config-built models: the file decodes (gguf package, transformers) to exactly the
weights our quantized model holds; llama.cpp's type rules; metadata; the GGUF schemes and their errors."""

import glob
import os

import numpy as np
import pytest
import torch

import gguf
from arhelpers import tiny_llama
from autoround import AutoRound
from autoround.quantizer.dtypes import gguf as gq
from autoround.quantizer.errors import FormatError, SchemeError
from autoround.quantizer.formats import get_format, list_formats
from autoround.quantizer.formats.gguf import permute_qk
from autoround.quantizer.schemes import QuantScheme, resolve_scheme


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (32,), generator=g) for _ in range(4)]


def _gguf_file(folder):
    files = glob.glob(os.path.join(folder, "*.gguf"))
    assert len(files) == 1, files
    return files[0]


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


def _load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(_gguf_file(folder)), dtype=torch.float32)


def test_every_gguf_file_type_is_a_registered_format_and_a_preset():
    formats = list_formats()
    for ft in gq.GGUF_FILE_TYPES:
        assert f"gguf:{ft}" in formats
        resolve_scheme(f"GGUF:{ft.upper()}")
    assert resolve_scheme("gguf:q4_k_m").describe().startswith("GGUF Q4_K_M")


def test_q4_k_m_file_follows_llama_cpp_rules_and_decodes_to_our_model(tmp_path):
    model = tiny_llama(hidden=256, inter=512, layers=2, vocab=256)
    ar = AutoRound(model, scheme="GGUF:Q4_K_M", iters=0, dataset=_calib(), nsamples=4, seqlen=32)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "q4km"), format="gguf:q4_k_m")
    reader = gguf.GGUFReader(_gguf_file(out))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count_kv") == 2
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    # llama.cpp: attn_v / ffn_down get q6_k on use_more_bits layers (layer 1 of 2), output q6_k
    assert types["blk.0.attn_v.weight"] == "q4_k" and types["blk.1.attn_v.weight"] == "q6_k"
    assert types["blk.0.ffn_down.weight"] == "q4_k" and types["blk.1.ffn_down.weight"] == "q6_k"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == "q4_k"
    assert types["output.weight"] == "q6_k" and types["output_norm.weight"] == "f32"

    ours = ar.model.state_dict()
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for t in reader.tensors:  # the gguf package's dequantizer gives exactly our fake-quantized weights
        if not t.name.startswith("blk.") or t.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        i, kind = t.name.split(".")[1:3]
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}[kind]
        w = ours[f"model.layers.{i}.{hf}.weight"]
        if kind in ("attn_q", "attn_k"):
            w = permute_qk(w, n_head if kind == "attn_q" else n_kv)
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        assert np.array_equal(deq, w.numpy()), t.name

    loaded = _load_hf(out).state_dict()  # transformers reads the file back (un-permuting q/k)
    for name, w in ours.items():
        if "embed_tokens" in name or "lm_head" in name:
            continue  # quantized in the file (q4_k / q6_k), float in our model
        assert torch.equal(loaded[name], w), name


def test_q4_0_plain_rtn_bytes_equal_the_gguf_package(tmp_path):
    model = tiny_llama(hidden=64, inter=96, layers=1, vocab=256)
    float_w = {k: v.clone() for k, v in model.state_dict().items()}
    ar = AutoRound(model, scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "q40"), format="gguf:q4_0")
    reader = gguf.GGUFReader(_gguf_file(out))
    tensors = {t.name: t for t in reader.tensors}
    for kind, hf in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj"), ("attn_output", "self_attn.o_proj")):
        t = tensors[f"blk.0.{kind}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        ref = gguf.quants.quantize(float_w[f"model.layers.0.{hf}.weight"].numpy(), gguf.GGMLQuantizationType.Q4_0)
        assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref)
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # q6_k does not fit 64


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                           sliding_window=64)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms: the file stores 1 + w
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("build,arch", [(_qwen2, "qwen2"), (_qwen3, "qwen3"), (_gemma3, "gemma3")])
def test_other_families_load_back_in_transformers(tmp_path, build, arch):
    model = build()
    ar = AutoRound(model, scheme="GGUF:Q8_0", iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / arch), format="gguf:q8_0")
    assert _field(gguf.GGUFReader(_gguf_file(out)), "general.architecture") == arch
    loaded = _load_hf(out)
    assert type(loaded).__name__ == type(model).__name__
    got = loaded.state_dict()
    for name, w in ar.model.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        if "norm" in name and arch == "gemma3":  # (1 + w) - 1 in float32
            torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0)
        else:
            assert torch.equal(got[name], w), name
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # only the q8_0 embedding differs
        torch.testing.assert_close(loaded(ids).logits, ar.model(ids).logits, atol=0.05, rtol=0.05)


def test_bf16_file(tmp_path):
    model = tiny_llama(hidden=64, inter=96, layers=1, vocab=256)
    ar = AutoRound(model, scheme="BF16", iters=0)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "bf16"), format="gguf:bf16")
    reader = gguf.GGUFReader(_gguf_file(out))
    assert {t.tensor_type.name for t in reader.tensors} == {"BF16", "F32"}
    got = _load_hf(out).state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(got[name], w.to(torch.bfloat16).float()), name


def test_gguf_format_with_an_integer_scheme_switches_to_the_gguf_scheme(tmp_path):
    ar = AutoRound(tiny_llama(hidden=64, inter=96, layers=1), scheme="W4A16", iters=0, disable_opt_rtn=True)
    ar.quantize_and_save(str(tmp_path / "x"), format="gguf:q4_0")
    assert ar.scheme == resolve_scheme("GGUF:Q4_0")


def test_scheme_errors():
    with pytest.raises(SchemeError, match="fixes bits=4, group_size=32, sym=False"):
        resolve_scheme("GGUF:Q4_K_M", bits=3)
    with pytest.raises(SchemeError, match="fixes"):
        QuantScheme(bits=4, group_size=128, sym=True, data_type="gguf:q4_0")
    with pytest.raises(SchemeError, match="valid"):
        QuantScheme(data_type="gguf:q9_0")


def test_gguf_scheme_with_another_format_fails_before_work(tmp_path):
    ar = AutoRound(tiny_llama(hidden=64, inter=96, layers=1), scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True)
    with pytest.raises(SchemeError, match="auto_round"):
        ar.quantize_and_save(str(tmp_path / "a"), format="auto_round")
    with pytest.raises(FormatError, match="gguf:q4_k_m writes a Q4_K_M file but the scheme is GGUF Q4_0"):
        ar.quantize_and_save(str(tmp_path / "b"), format="gguf:q4_k_m")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_layer_config_can_pick_a_gguf_type_per_layer(tmp_path):
    model = tiny_llama(hidden=64, inter=96, layers=1)
    ar = AutoRound(model, scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True,
                   layer_config={"mlp.down_proj": "GGUF:Q8_0", "self_attn.o_proj": {"bits": 16}})
    _, (out,) = ar.quantize_and_save(str(tmp_path / "lc"), format="gguf:q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(_gguf_file(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == "Q4_0"


def test_unknown_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128)).eval()
    fmt = get_format("gguf:q8_0")
    from autoround.quantizer.formats import ExportJob

    with pytest.raises(FormatError, match="does not know the architecture 'gpt2'"):
        fmt.save(ExportJob(model=model, layers={}, scheme=resolve_scheme("GGUF:Q8_0"), block_names=[]), str(tmp_path / "g"))
    assert not (tmp_path / "g").exists()


def test_layer_config_naming_lm_head_sets_the_output_type(tmp_path):
    """A layer_config entry for lm_head itself quantizes it with that type (before, the file's rule silently won)."""
    model = tiny_llama(hidden=256, inter=256, layers=1, vocab=256)
    ar = AutoRound(model, scheme="GGUF:Q2_K_S", layer_config={"lm_head": "GGUF:Q4_K_S"}, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "q2"), format="gguf:q2_k_s")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(_gguf_file(out)).tensors}
    assert types["output.weight"] == "Q4_K"
    _, (out,) = AutoRound(tiny_llama(hidden=256, inter=256, layers=1, vocab=256), scheme="GGUF:Q2_K_S", iters=0,
                          disable_opt_rtn=True).quantize_and_save(str(tmp_path / "rule"), format="gguf:q2_k_s")
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(_gguf_file(out)).tensors}["output.weight"] == "Q6_K"
