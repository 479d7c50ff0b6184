"""MoE models with transformers 5's fused 3-D experts: unfused expert by expert for quantization, routers kept
float, exports read back (auto_round through our loader, fake through plain transformers), experts that no token
reaches, and the refusals before work."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoround import AutoRound
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.moe import UnfusedExperts, fused_experts, unfuse_experts

CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
DATA = dict(dataset=CALIB, nsamples=8, seqlen=32, batch_size=4)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)


def mixtral(experts=4, top_k=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(intermediate_size=128, num_local_experts=experts, num_experts_per_tok=top_k, **COMMON)
    return MixtralForCausalLM(cfg).eval()


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                         head_dim=16, **COMMON)
    return Qwen3MoeForCausalLM(cfg).eval()


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                         num_experts=4, num_experts_per_tok=2, **COMMON)
    return Qwen2MoeForCausalLM(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("build", [mixtral, qwen3_moe, qwen2_moe])
def test_unfused_experts_compute_what_the_fused_ones_did(build):
    m = build()
    ref = _logits(m)
    names = unfuse_experts(m)
    assert names and not fused_experts(m)
    assert isinstance(m.get_submodule(names[0]), UnfusedExperts)
    assert torch.allclose(_logits(m), ref, atol=1e-5)


@pytest.mark.parametrize("build", [mixtral, qwen3_moe])
def test_every_expert_is_quantized_and_auto_round_loads_back(tmp_path, build):
    from autoround import AutoRoundConfig  # noqa: F401  (registers the loader)

    m = build()
    n = m.model.layers[0].mlp.experts.num_experts
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=2, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    experts = [k for k in ar.layers if ".mlp.experts." in k]
    assert len(experts) == 2 * 3 * n  # gate/up/down of every expert of both blocks
    assert not any(k.endswith((".gate", ".router")) for k in ar.layers)  # routers stay float
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.experts, UnfusedExperts)
    assert hasattr(loaded.model.layers[1].mlp.experts[n - 1].down_proj, "kernel_name")
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


def test_fake_export_fuses_the_experts_back(tmp_path):
    m = mixtral()
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "fake"), format="fake")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert fused_experts(plain)  # the model class's own 3-D layout
    for i, layer in enumerate(plain.model.layers):  # each expert's quantized values, exactly, in the fused tensors
        fused, mine = layer.mlp.experts, ar.model.model.layers[i].mlp.experts
        for e in range(len(mine)):
            gate_up = torch.cat([mine[e].gate_proj.weight, mine[e].up_proj.weight])
            assert torch.equal(fused.gate_up_proj[e], gate_up) and torch.equal(fused.down_proj[e], mine[e].down_proj.weight)
    # the fused experts' batched matmuls sum in another order than one linear layer per expert (CPU-dependent)
    assert torch.allclose(_logits(plain), _logits(ar.model), atol=1e-5, rtol=1e-5)


def test_shared_expert_gate_stays_float_and_shared_expert_is_quantized():
    m = qwen2_moe()
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, **DATA)
    ar.quantize()
    assert "model.layers.0.mlp.shared_expert_gate" not in ar.layers
    assert "model.layers.0.mlp.shared_expert.down_proj" in ar.layers


def test_experts_no_token_reaches_get_plain_rtn_ranges(caplog):
    """16 experts, top-1, 4 calibration tokens: most experts see nothing; those are named in the log and
    quantized as plain RTN would (no importance)."""
    m = mixtral(experts=16, top_k=1)
    plain = mixtral(experts=16, top_k=1)
    data = dict(dataset=[CALIB[0][:4]], nsamples=1, seqlen=4, batch_size=1)
    with caplog.at_level(logging.INFO, logger="autoround"):
        ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, **data)
        ar.quantize()
    assert "saw no calibration token" in caplog.text
    ref = AutoRound(plain, scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True, **data)
    ref.quantize()
    hits = [k for k in ar.layers if ".experts." in k and torch.equal(ar.layers[k].weight.dequantize(),
                                                                      ref.layers[k].weight.dequantize())]
    assert len(hits) >= 3 * 10  # at least 10 of 16 experts per block untouched by calibration: plain RTN


def _routed(model, ids):
    """Block index -> the experts the float model routes ``ids``' tokens to."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen.setdefault(i, set()).update(idx.flatten().tolist())
        hooks.append(layer.mlp.experts.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("iters", [0, 2])
def test_static_activation_experts_no_token_reaches_take_their_siblings_largest_amax(tmp_path, iters, caplog):
    """FP8_STATIC on 16 experts, top-1, 4 calibration tokens: the unseen experts' input scales come from the largest
    amax of the same layer in the experts that saw tokens (the reference's rule); it exports and loads back."""
    from autoround import AutoRoundConfig  # noqa: F401  (registers the loader)

    tokens = CALIB[0][:4]
    routed = _routed(mixtral(experts=16, top_k=1), tokens[None])
    data = dict(dataset=[tokens], nsamples=1, seqlen=4, batch_size=1)
    ar = AutoRound(mixtral(experts=16, top_k=1), scheme="FP8_STATIC", iters=iters, **data)
    with caplog.at_level(logging.INFO, logger="autoround"):
        _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    assert "MoE expert layers saw no calibration token" in caplog.text
    for block, seen in routed.items():
        assert 0 < len(seen) < 16
        for proj in ("gate_proj", "up_proj", "down_proj"):
            amax = [float(ar.layers[f"model.layers.{block}.mlp.experts.{e}.{proj}"].input_amax) for e in range(16)]
            top = max(amax[e] for e in seen)
            assert all(amax[e] == top for e in range(16) if e not in seen)
            if proj == "down_proj" and len(seen) > 1:  # each seen expert keeps its own range
                assert len({amax[e] for e in seen}) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(loaded), _logits(ar.model))


def test_unify_moe_input_scale_gives_every_experts_input_projections_one_amax(monkeypatch):
    monkeypatch.setenv("AR_ENABLE_UNIFY_MOE_INPUT_SCALE", "1")
    ar = AutoRound(mixtral(experts=8, top_k=2), scheme="FP8_STATIC", iters=0, **DATA)
    ar.quantize()
    for block in (0, 1):
        amax = {p: {float(ar.layers[f"model.layers.{block}.mlp.experts.{e}.{p}"].input_amax) for e in range(8)}
                for p in ("gate_proj", "up_proj", "down_proj")}
        assert len(amax["gate_proj"]) == len(amax["up_proj"]) == 1
        assert len(amax["down_proj"]) > 1  # the down projections' inputs differ per expert: not unified


def test_unify_moe_input_scale_without_static_expert_inputs_is_refused(monkeypatch):
    monkeypatch.setenv("AR_ENABLE_UNIFY_MOE_INPUT_SCALE", "1")
    ar = AutoRound(mixtral(), scheme="W4A16", group_size=32, iters=2, **DATA)
    with pytest.raises(AutoRoundError, match="AR_ENABLE_UNIFY_MOE_INPUT_SCALE is set, but no MoE expert input"):
        ar.quantize()
    assert not ar.layers


def test_a_static_layer_that_saw_nothing_outside_the_experts_is_refused_by_name():
    from autoround.quantizer.act_quant import static_amax
    from autoround.quantizer.schemes import resolve_scheme

    fp8 = resolve_scheme("FP8_STATIC")
    schemes = {"mlp.experts.0.up_proj": fp8, "mlp.experts.1.up_proj": fp8, "visual.proj": fp8}
    with pytest.raises(AutoRoundError, match=r"1 layer\(s\) with a static activation scale saw no .*visual.proj"):
        static_amax(schemes, {"mlp.experts.0.up_proj": torch.tensor(2.0)})
    got = static_amax({k: v for k, v in schemes.items() if k != "visual.proj"}, {"mlp.experts.0.up_proj": torch.tensor(2.0)})
    assert float(got["mlp.experts.1.up_proj"]) == 2.0


@pytest.mark.parametrize("fmt", ["auto_gptq", "llm_compressor", "gguf:q4_0", "auto_awq"])
def test_formats_that_cannot_write_unfused_experts_refuse_before_work(tmp_path, fmt):
    ar = AutoRound(mixtral(), scheme="W4A16", group_size=32, iters=2, **DATA)
    with pytest.raises(AutoRoundError, match="cannot write this MoE model's experts"):
        ar.quantize_and_save(str(tmp_path / "out"), format=fmt)
    assert not (tmp_path / "out").exists() and not ar.pipeline.quantized


def test_gpt_oss_expert_layout_is_refused_clearly():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, head_dim=16,
                       **{**COMMON, "num_key_value_heads": 2})
    with pytest.raises(AutoRoundError, match="biased or transposed expert layouts"):
        AutoRound(GptOssForCausalLM(cfg).eval(), scheme="W4A16", group_size=32, iters=0, **DATA)


def test_model_free_route_declines_fused_experts(tmp_path):
    folder = tmp_path / "mixtral"
    mixtral().save_pretrained(folder)
    with pytest.raises(AutoRoundError, match="fused 3-D parameters"):
        AutoRound(str(folder), scheme="W4A16", group_size=32, model_free=True).quantize_and_save(
            str(tmp_path / "out"))


def test_experts_loaded_from_a_folder_are_not_copied_as_extra_tensors(tmp_path):
    """Whatever names transformers saves the experts under, loading fuses them into the model: none of them is
    taken for a tensor the class never instantiates."""
    folder = tmp_path / "mixtral"
    mixtral().save_pretrained(folder)
    ar = AutoRound(str(folder), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True,
                   disable_model_free=True)
    assert ar.pipeline.source_tensors == {}
    ar.quantize()
    assert len([k for k in ar.layers if ".experts." in k]) == 2 * 3 * 4
