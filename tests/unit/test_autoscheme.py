"""AutoScheme: the exact knapsack, the groups that share a scheme, the budget, fixed layers, determinism, the
errors before any work, and a mixed-bit checkpoint that transformers loads."""

import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from autoround import AutoRound, AutoScheme
from autoround.quantizer import sensitivity
from autoround.quantizer.autoscheme import choose, layer_bits, layer_groups
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.schemes import resolve_scheme

from arhelpers import tiny_llama

CALIB = [torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
RUN = dict(iters=0, dataset=CALIB, nsamples=4, seqlen=24, batch_size=2)
SCORING = dict(nsamples=4, seqlen=24, batch_size=2)  # the scoring pass's calibration: all of CALIB


def brute_force(costs, scores, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[k] for c, k in zip(costs, pick))
        if cost > budget:
            continue
        score = sum(s[k] for s, k in zip(scores, pick))
        if best is None or score < best[0] - 1e-12:
            best = (score, pick)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_exact_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 7)), int(rng.integers(2, 4))
    costs = [sorted(rng.integers(1, 50, size=k).tolist()) for _ in range(n)]
    scores = [sorted(rng.random(k).tolist(), reverse=True) if seed % 2 else rng.random(k).tolist() for _ in range(n)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(rng.integers(lo, hi + 1))
    pick = choose(costs, scores, budget)
    want = brute_force(costs, scores, budget)
    assert sum(c[p] for c, p in zip(costs, pick)) <= budget
    assert sum(s[p] for s, p in zip(scores, pick)) == pytest.approx(want[0])
    assert choose(costs, scores, lo - 1) is None


def test_groups_fuse_siblings_experts_and_shared_layers():
    names = [f"model.layers.{b}.{x}" for b in range(2) for x in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.1.gate_proj", "mlp.experts.1.down_proj",
        "mlp.down_proj",
    )]
    groups = layer_groups(names, ["model.layers"], shared_layers=[["o_proj", r"mlp\.down_proj$"]])
    as_sets = [set(g) for g in groups]
    for b in range(2):
        p = f"model.layers.{b}."
        assert {p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"} in as_sets
        assert {p + f"mlp.experts.{e}.{x}" for e, x in ((0, "gate_proj"), (0, "up_proj"), (1, "gate_proj"),
                                                         (1, "down_proj"))} in as_sets
        assert {p + "self_attn.o_proj", p + "mlp.down_proj"} in as_sets  # one group per block, not across
    assert len(groups) == 6
    with pytest.raises(AutoRoundError, match="matches no quantizable layer"):
        layer_groups(names, ["model.layers"], shared_layers=[["fc1"]])


def test_layer_bits_count_scales_and_zero_points():
    w4 = resolve_scheme("W4A16")
    assert layer_bits(w4, 256, 8) == 4 * 256 * 8 + 8 * 2 * (16 + 4)
    assert layer_bits(w4, 256, 8, with_metadata=False) == 4 * 256 * 8
    assert layer_bits(resolve_scheme("BF16"), 256, 8) == 16 * 256 * 8


@pytest.mark.parametrize("kw, match", [
    (dict(avg_bits=[3, 4], options="W2A16,W4A16"), "one positive number"),
    (dict(avg_bits=3, options="W2A16,W9A16"), "AutoScheme option 'W9A16'"),
    (dict(avg_bits=3, options=""), "at least one scheme"),
    (dict(avg_bits=3, options="W2A16,W4A16", low_gpu_mem_usage=False), "low_gpu_mem_usage=False is not supported"),
    (dict(avg_bits=3, options="W2A16,W4A16", shared_layers="q_proj"), "list of groups"),
])
def test_bad_autoscheme_arguments(kw, match):
    with pytest.raises(AutoRoundError, match=match):
        AutoScheme(**kw)


def _no_scoring(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("sensitivity scoring started")

    monkeypatch.setattr(sensitivity, "delta_loss_scores", fail)


@pytest.mark.parametrize("auto, fmt, match", [
    (AutoScheme(avg_bits=1.5, options="W2A16G32,W4A16", **SCORING), "fake", "below the cheapest"),
    (AutoScheme(avg_bits=9.0, options="W2A16G32,W4A16", **SCORING), "fake", "above the dearest"),
    (AutoScheme(avg_bits=3.0, options="W2A16G32,GGUF:Q4_0", **SCORING), "auto_round",
     "option GGUF Q4_0 .* cannot be written as 'auto_round'"),
    (AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", **SCORING), "auto_awq", "holds one scheme"),
])
def test_errors_before_any_work(tmp_path, monkeypatch, auto, fmt, match):
    _no_scoring(monkeypatch)
    ar = AutoRound(tiny_llama(), scheme=auto, **RUN)
    with pytest.raises(AutoRoundError, match=match):
        ar.quantize_and_save(str(tmp_path / "out"), format=fmt)
    assert not (tmp_path / "out").exists() and not ar.quantized


def test_overrides_with_autoscheme_are_refused():
    with pytest.raises(AutoRoundError, match="bits cannot be combined with scheme=AutoScheme"):
        AutoRound(tiny_llama(), scheme=AutoScheme(avg_bits=3, options="W2A16,W4A16", **SCORING), bits=4)


def test_budget_fixed_layers_fused_groups_and_determinism(tmp_path):
    auto = AutoScheme(avg_bits=3.6, options="W2A16G32,W4A16,W8A16", **SCORING)
    fixed = {"model.layers.1.mlp.down_proj": {"bits": 8}}
    ar = AutoRound(tiny_llama(), scheme=auto, layer_config=fixed, **RUN)
    _, layer_config = ar.quantize()
    result = ar.pipeline.auto_result
    assert result.achieved_bits <= 3.6
    assert layer_config["model.layers.1.mlp.down_proj"]["bits"] == 8
    model = ar.model
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in layer_config)
    bits = sum(layer_bits(resolve_scheme(layer_config[n]), m.in_features, m.out_features)
               for n, m in model.named_modules() if n in layer_config)
    assert bits / total == pytest.approx(result.achieved_bits) and bits / total <= 3.6
    assert len({layer_config[f"model.layers.0.mlp.{x}"]["bits"] for x in ("gate_proj", "up_proj")}) == 1
    assert len({layer_config[f"model.layers.0.self_attn.{x}"]["bits"] for x in ("q_proj", "k_proj", "v_proj")}) == 1
    assert len({c["bits"] for c in layer_config.values()}) >= 2  # the budget forces a real mix
    again = AutoRound(tiny_llama(), scheme=auto, layer_config=fixed, **RUN)
    assert again.quantize()[1] == layer_config


def test_float_option_and_checkpoint_loads(tmp_path):
    auto = AutoScheme(avg_bits=6.0, options=["W2A16G32", "BF16"], **SCORING)
    ar = AutoRound(tiny_llama(), scheme=auto, **RUN)
    model, (out,) = ar.quantize_and_save(str(tmp_path / "out"), format="auto_round")
    assert ar.plan.keep_float and ar.plan.quantize
    extra = json.load(open(os.path.join(out, "config.json")))["quantization_config"].get("extra_config", {})
    assert all(extra[n]["bits"] == 16 for n in ar.plan.keep_float)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-3)


def test_cli_autoscheme(tmp_path):
    from autoround.quantizer.cli import main

    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    assert main([str(src), "--avg_bits", "3", "--options", "W2A16G32,W4A16", "--scheme", "W8A16",
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert main([str(src), "--ignore_scale_zp_bits", "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_signround_tunes_the_chosen_schemes():
    auto = AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", **SCORING)
    ar = AutoRound(tiny_llama(), scheme=auto, **{**RUN, "iters": 2})
    _, layer_config = ar.quantize()
    assert {c["bits"] for c in layer_config.values()} == {2, 4}
    for name, layer in ar.layers.items():
        assert layer.scheme.bits == layer_config[name]["bits"]
        assert torch.equal(ar.model.get_submodule(name).weight, layer.weight.dequantize())


def test_auto_gptq_export_records_the_choices_as_dynamic_entries(tmp_path):
    auto = AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", **SCORING)
    ar = AutoRound(tiny_llama(), scheme=auto, **RUN)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "gptq"), format="auto_gptq")
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    chosen = {n: layer.scheme.bits for n, layer in ar.layers.items()}
    dynamic = qcfg.get("dynamic", {})
    for name, bits in chosen.items():
        entry = dynamic.get("+:^" + re.escape(name) + "$", {})
        assert entry.get("bits", qcfg["bits"]) == bits, name
    assert len(set(chosen.values())) == 2


def test_scoring_defaults_from_the_environment(monkeypatch):
    """AR_AUTO_SCHEME_NSAMPLES / AR_AUTO_SCHEME_BATCH_SIZE change the scoring defaults; explicit fields win."""
    monkeypatch.delenv("AR_AUTO_SCHEME_NSAMPLES", raising=False)
    monkeypatch.delenv("AR_AUTO_SCHEME_BATCH_SIZE", raising=False)
    assert AutoScheme(avg_bits=3, options="W2A16,W4A16").scoring() == (16, 256, 8)
    monkeypatch.setenv("AR_AUTO_SCHEME_NSAMPLES", "4")
    monkeypatch.setenv("AR_AUTO_SCHEME_BATCH_SIZE", "2")
    assert AutoScheme(avg_bits=3, options="W2A16,W4A16").scoring() == (4, 256, 2)
    assert AutoScheme(avg_bits=3, options="W2A16,W4A16", nsamples=6, batch_size=3, seqlen=64).scoring() == (6, 64, 3)
    monkeypatch.setenv("AR_AUTO_SCHEME_NSAMPLES", "0")
    with pytest.raises(ValueError, match="AR_AUTO_SCHEME_NSAMPLES='0' is invalid"):
        AutoScheme(avg_bits=3, options="W2A16,W4A16").scoring()


def test_invalid_scoring_variable_is_refused_before_any_work(monkeypatch):
    monkeypatch.setenv("AR_AUTO_SCHEME_BATCH_SIZE", "many")
    with pytest.raises(AutoRoundError, match="AR_AUTO_SCHEME_BATCH_SIZE='many' is invalid: it must be a positive"):
        AutoRound(tiny_llama(), scheme=AutoScheme(avg_bits=3, options="W2A16,W4A16"), iters=0)
