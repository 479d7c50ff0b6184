"""The typed options: one set of defaults read by the API and the CLI, bad values and options of features that
do not exist here refused before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autoround.quantizer import options as opts
from autoround.quantizer.cli import build_parser
from autoround.quantizer.errors import AutoRoundError, SchemeError

from arhelpers import tiny_llama


def test_cli_defaults_are_the_option_defaults():
    args = build_parser().parse_args([])
    values = opts.cli_values(args)
    base = opts.defaults()
    assert values and all(values[k] == base[k] for k in values), {k: (values[k], base[k]) for k in values}
    hidden = {f.name for g in opts.GROUPS for f in dataclasses.fields(g) if not f.metadata.get("cli", True)}
    assert set(values) == set(base) - hidden  # every other option has a flag


def test_recipes_change_only_their_defaults():
    light = opts.cli_values(build_parser(recipe="light").parse_args([]))
    assert (light["iters"], light["lr"], light["nsamples"], light["init_range"]) == (12, 2e-2, 128, "search")
    # an explicit value still means what it says
    light = opts.cli_values(build_parser(recipe="light").parse_args(["--iters", "50", "--init_range", "minmax"]))
    assert (light["iters"], light["init_range"]) == (50, "minmax")
    assert opts.cli_values(build_parser().parse_args([]))["init_range"] == "auto"
    best = opts.cli_values(build_parser(recipe="best").parse_args(["--iters", "7"]))
    assert (best["iters"], best["nsamples"]) == (7, 512)


def test_cli_switches_reach_the_options():
    args = build_parser().parse_args(["--asym", "--disable_amp", "--disable_minmax_tuning", "--bs", "2",
                                      "--fp_layers", "lm_head", "--adam"])
    plan, calib, tuning, runtime = opts.build_options(opts.cli_values(args))
    assert plan.sym is False and plan.ignore_layers == "lm_head"
    assert tuning.amp is False and tuning.enable_minmax_tuning is False and tuning.enable_adam is True
    assert tuning.batch_size == 2 and tuning.enable_quanted_input is True


@pytest.mark.parametrize("kw,msg", [
    ({"super_bits": 6}, "super_bits / super_group_size are fixed by the GGUF type"),
    ({"super_group_size": 16}, "super_bits / super_group_size are fixed by the GGUF type"),
    ({"scale_dtype": "bf16"}, "scale_dtype='bf16' is not supported"),
    ({"nblocks": 2}, "nblocks=2 is not supported yet"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": -1.0}, "lr must be positive"),
])
def test_unsupported_or_bad_values_are_refused_at_construction(kw, msg):
    from autoround import AutoRound

    with pytest.raises(AutoRoundError, match=msg):
        AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True, **kw)


def test_usual_values_of_compatibility_options_are_accepted():
    from autoround import AutoRound

    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True, scale_dtype=torch.float16, nblocks=1, act_bits=16)
    assert ar.scheme.act_bits == 16 and ar.plan_options.scale_dtype is torch.float16


def test_act_bits_reaches_the_scheme():
    from autoround import AutoRound

    ar = AutoRound(tiny_llama(), iters=0, act_bits=8)  # W4A8: int4 weights, int8 per-token activations
    assert (ar.scheme.act_bits, ar.scheme.act_group_size, ar.scheme.act_scheme().data_type) == (8, -1, "int")
    with pytest.raises(SchemeError, match="act_bits=6 is not supported"):
        AutoRound(tiny_llama(), iters=0, act_bits=6)


def test_unsupported_environment_variables_are_refused(monkeypatch):
    from autoround import AutoRound

    monkeypatch.setenv("AR_USE_MODELSCOPE", "0")  # the default: accepted
    AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)
    monkeypatch.setenv("AR_USE_MODELSCOPE", "1")
    monkeypatch.setenv("AR_ENABLE_COMPILE_PACKING", "1")
    with pytest.raises(AutoRoundError,
                       match=r"AR_USE_MODELSCOPE='1' \(only the Hugging Face.*AR_ENABLE_COMPILE_PACKING='1'"):
        AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)


def test_inplace_false_is_refused_before_work(tmp_path):
    from autoround import AutoRound

    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True)
    with pytest.raises(AutoRoundError, match="inplace=False is not supported"):
        ar.quantize_and_save(str(tmp_path / "out"), inplace=False)
    assert not (tmp_path / "out").exists() and not ar.quantized


def test_dynamo_cache_limit_is_applied_when_compiling(monkeypatch):
    from autoround.quantizer import block_runner

    monkeypatch.setenv("AR_DYNAMO_CACHE_SIZE_LIMIT", "17")
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)
    block_runner.compiled_or_eager(lambda x: x + 1)
    assert torch._dynamo.config.cache_size_limit == 17


def test_autoround_signature_lists_every_option_with_its_default():
    import inspect

    from autoround import AutoRound

    params = inspect.signature(AutoRound).parameters
    assert list(params)[:2] == ["model", "tokenizer"]
    assert {n: p.default for n, p in list(params.items())[2:]} == opts.defaults()
    with pytest.raises(TypeError, match=r"unknown argument.*'itres'"):
        AutoRound(tiny_llama(), itres=3)
