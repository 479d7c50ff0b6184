"""SGLang (its own virtualenv from AR_TEST_SGLANG_PYTHON) serves AutoRound checkpoints through the
``auto-round`` method that this project's ``sglang.srt.plugins`` entry point registers.

What runs here is SGLang's own code: its plugin loader, ``ModelConfig`` (which picks the method from the
checkpoint), ``get_quant_config`` (which builds our config from ``quantization_config``), its fused linear
layers and parameter classes, and their weight loaders.  The layers' outputs must equal transformers with this
project's loader.  SGLang's CPU engine then generates greedily from our checkpoint token for token like
transformers; it imports the CPU build of sgl-kernel, which PyPI does not ship, so its subprocess gets a
test-only import shim (tests/engines/shims) whose functions are never called."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from engine_helpers import (
    assert_same_tokens, autoscheme_bits, assert_sensible_half_output, check_openai_server, copy_checkpoint, engine_python,
    rewrite_tensors, run_engine, tiny_checkpoint_with_quantized_lm_head, tiny_prompt_ids, transformers_greedy,
)

pytestmark = pytest.mark.slow

LAYER = 3
MIXED_LAYER = 1
# the mixed-bits checkpoint: block 1 has 8-bit g64 attention inputs, a float o_proj, 3-bit gate/up, 2-bit down
MIXED = {
    **{f"model.layers.{MIXED_LAYER}.self_attn.{p}": {"bits": 8, "group_size": 64} for p in ("q_proj", "k_proj", "v_proj")},
    f"model.layers.{MIXED_LAYER}.self_attn.o_proj": {"bits": 16},
    **{f"model.layers.{MIXED_LAYER}.mlp.{p}": {"bits": 3, "group_size": 64} for p in ("gate_proj", "up_proj")},
    f"model.layers.{MIXED_LAYER}.mlp.down_proj": {"bits": 2, "group_size": 32},
}


@pytest.fixture(scope="module")
def sglang_python():
    return engine_python("AR_TEST_SGLANG_PYTHON")


@pytest.fixture(scope="module")
def mixed_ckpt(smollm2_folder, tmp_path_factory):
    from autoround import AutoRound

    out = tmp_path_factory.mktemp("engines-sglang") / "ours-mixed"
    AutoRound(str(smollm2_folder), scheme="W4A16", iters=0, disable_opt_rtn=True, layer_config=MIXED).quantize_and_save(
        str(out), format="auto_round")
    return out


@pytest.fixture(scope="module")
def awq_ckpt(smollm2_folder, tmp_path_factory):
    from autoround import AutoRound

    out = tmp_path_factory.mktemp("engines-sglang") / "ours-awq"
    AutoRound(str(smollm2_folder), scheme="W4A16", sym=False, group_size=64, iters=0,
              disable_opt_rtn=True).quantize_and_save(str(out), format="auto_round")
    return out


def _config(sglang_python, ckpt, tmp_path, prefixes):
    out = tmp_path / "config.json"
    run_engine(sglang_python, "sglang-config", "--model", ckpt, "--prefixes", ",".join(prefixes), "--out", out,
               timeout=900)
    return json.loads(out.read_text())


def test_sglang_picks_our_method_for_our_checkpoint(sglang_python, ours_w4a16, tmp_path):
    qcfg = json.loads((ours_w4a16 / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "auto-round" and qcfg["packing_format"] == "auto_round:auto_gptq"
    res = _config(sglang_python, ours_w4a16, tmp_path, [
        "model.layers.0.self_attn.qkv_proj", "model.layers.29.mlp.gate_up_proj", "model.layers.5.mlp.down_proj",
        "lm_head",
    ])
    assert res["registry"] == "AutoRoundSglangConfig"  # the entry point replaced SGLang's built-in class
    assert res["quantization"] == "auto-round" and res["config_class"] == "AutoRoundSglangConfig"
    assert res["packing_format"] == "auto_round:auto_gptq"
    plans = res["plans"]
    qkv = plans["model.layers.0.self_attn.qkv_proj"]
    assert qkv["scheme"] == "W4A16 int group 128 sym" and qkv["quantized"]
    assert qkv["parts"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert plans["model.layers.29.mlp.gate_up_proj"]["parts"] == [
        "model.layers.29.mlp.gate_proj", "model.layers.29.mlp.up_proj"]
    assert plans["model.layers.5.mlp.down_proj"]["scheme"] == "W4A16 int group 128 sym"
    assert plans["lm_head"]["quantized"] is False  # tied embeddings: the head stays float


def test_sglang_parses_mixed_bits_config(sglang_python, mixed_ckpt, tmp_path):
    extra = json.loads((mixed_ckpt / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra[f"model.layers.{MIXED_LAYER}.mlp.down_proj"]["bits"] == 2
    p = f"model.layers.{MIXED_LAYER}"
    res = _config(sglang_python, mixed_ckpt, tmp_path, [
        f"{p}.self_attn.qkv_proj", f"{p}.self_attn.o_proj", f"{p}.mlp.gate_up_proj", f"{p}.mlp.down_proj",
        "model.layers.2.self_attn.qkv_proj",
    ])
    plans = res["plans"]
    assert plans[f"{p}.self_attn.qkv_proj"]["scheme"] == "W8A16 int group 64 sym"
    assert plans[f"{p}.self_attn.o_proj"]["quantized"] is False
    assert plans[f"{p}.mlp.gate_up_proj"]["scheme"] == "W3A16 int group 64 sym"
    assert plans[f"{p}.mlp.down_proj"]["scheme"] == "W2A16 int group 32 sym"
    assert plans["model.layers.2.self_attn.qkv_proj"]["scheme"] == "W4A16 int group 128 sym"


# --- SGLang layers against transformers ------------------------------------------------------------------
def _transformers_outputs(ckpt, layer: int, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    import autoround  # noqa: F401  (registers the loader)

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    block = model.model.layers[layer]
    att, mlp = block.self_attn, block.mlp
    with torch.inference_mode():
        return {
            "qkv_proj": torch.cat([att.q_proj(x["x_hidden"]), att.k_proj(x["x_hidden"]), att.v_proj(x["x_hidden"])], -1),
            "gate_up_proj": torch.cat([mlp.gate_proj(x["x_hidden"]), mlp.up_proj(x["x_hidden"])], -1),
            "o_proj": att.o_proj(x["x_attn"]),
            "down_proj": mlp.down_proj(x["x_inter"]),
        }


def _sglang_layers(sglang_python, ckpt, layer, tmp_path, check=True):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(layer)
    x = {"x_hidden": torch.randn(5, 576, generator=g), "x_attn": torch.randn(5, 576, generator=g),
         "x_inter": torch.randn(5, 1536, generator=g)}
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    save_file(x, str(inputs))
    proc = run_engine(sglang_python, "sglang-layers", "--model", ckpt, "--layer", layer, "--inputs", inputs,
                      "--out", out, check=check, timeout=900)
    return x, out, proc


def _compare(sglang_python, ckpt, layer, tmp_path):
    from safetensors.torch import load_file

    x, out, _ = _sglang_layers(sglang_python, ckpt, layer, tmp_path)
    got = load_file(str(out))
    report = json.loads((tmp_path / "outputs.safetensors.json").read_text())
    want = _transformers_outputs(ckpt, layer, x)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (name, got[name].shape, ref.shape)
        # same kernel family on both sides; fused vs separate layers may only reorder float sums
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return report


def test_sglang_layers_load_and_match_transformers(sglang_python, ours_w4a16, tmp_path):
    report = _compare(sglang_python, ours_w4a16, LAYER, tmp_path)
    assert set(report["methods"].values()) == {"AutoRoundLinearMethod"}, report["methods"]
    assert all(report["kernels"].values()), report["kernels"]  # one of this project's kernels each
    # SGLang's parameter classes, sharded for the fused layers as its GPTQ method does
    assert report["params"]["qkv_proj"] == {
        "qweight": "PackedvLLMParameter", "qzeros": "PackedColumnParameter", "scales": "ChannelQuantScaleParameter",
        "g_idx": "RowvLLMParameter"}
    p = f"model.layers.{LAYER}"
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        for t in ("qweight", "qzeros", "scales"):
            assert f"{p}.{part}.{t}" in report["loaded"]


def test_sglang_mixed_bits_layers_match_transformers(sglang_python, mixed_ckpt, tmp_path):
    report = _compare(sglang_python, mixed_ckpt, MIXED_LAYER, tmp_path)
    assert report["methods"]["o_proj"] == "UnquantizedLinearMethod"  # bits 16 in extra_config: float
    assert report["methods"]["down_proj"] == "AutoRoundLinearMethod"


def test_sglang_autoscheme_layers_match_transformers(sglang_python, ours_autoscheme, tmp_path):
    """A block of the AutoScheme checkpoint whose layers differ in bits: SGLang's fused layers load it and
    compute what transformers does."""
    default, bits = autoscheme_bits(ours_autoscheme)

    def layer_bits(b, name):
        return bits.get(f"model.layers.{b}.{name}", default)

    parts = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    mixed = [b for b in range(30) if len({layer_bits(b, p) for p in parts}) > 1]
    assert mixed, bits
    for b in range(30):  # the fused parts share one choice
        assert len({layer_bits(b, f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")}) == 1
        assert len({layer_bits(b, f"mlp.{p}") for p in ("gate_proj", "up_proj")}) == 1
    report = _compare(sglang_python, ours_autoscheme, mixed[0], tmp_path)
    assert set(report["methods"].values()) == {"AutoRoundLinearMethod"}, report["methods"]


def test_sglang_awq_packed_layers_match_transformers(sglang_python, awq_ckpt, tmp_path):
    qcfg = json.loads((awq_ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg["packing_format"] == "auto_round:auto_awq" and qcfg["sym"] is False
    report = _compare(sglang_python, awq_ckpt, LAYER, tmp_path)
    assert set(report["methods"].values()) == {"AutoRoundLinearMethod"}, report["methods"]
    # AWQ layout: qweight packed along the output dimension, no g_idx
    assert report["params"]["gate_up_proj"] == {
        "qweight": "PackedvLLMParameter", "qzeros": "PackedColumnParameter", "scales": "ChannelQuantScaleParameter"}


# --- bad checkpoints -------------------------------------------------------------------------------------
def _fails(sglang_python, folder, tmp_path):
    _, _, proc = _sglang_layers(sglang_python, folder, LAYER, tmp_path / folder.name, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def test_sglang_bad_checkpoints_fail_clearly(sglang_python, ours_w4a16, tmp_path):
    for name in ("missing", "shapes", "bits", "fused"):
        (tmp_path / name).mkdir()
    missing = copy_checkpoint(ours_w4a16, tmp_path / "missing", "ckpt")
    rewrite_tensors(missing, lambda t: t.pop(f"model.layers.{LAYER}.self_attn.k_proj.qzeros"))
    out = _fails(sglang_python, missing, tmp_path / "missing")
    assert "ModelLoadError" in out and f"model.layers.{LAYER}.self_attn.k_proj.qzeros" in out and "missing" in out

    shapes = copy_checkpoint(ours_w4a16, tmp_path / "shapes", "ckpt")
    key = f"model.layers.{LAYER}.mlp.down_proj.scales"
    rewrite_tensors(shapes, lambda t: t.update({key: t[key][:-1].clone()}))
    out = _fails(sglang_python, shapes, tmp_path / "shapes")
    assert f"{key} has shape (11, 576)" in out and "(12, 576)" in out

    bits = copy_checkpoint(ours_w4a16, tmp_path / "bits", "ckpt")
    cfg = json.loads((bits / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (bits / "config.json").write_text(json.dumps(cfg))
    out = _fails(sglang_python, bits, tmp_path / "bits")
    assert "default scheme is 5-bit" in out and "2, 3, 4, 8-bit" in out

    fused = copy_checkpoint(ours_w4a16, tmp_path / "fused", "ckpt")
    cfg = json.loads((fused / "config.json").read_text())
    cfg["quantization_config"]["extra_config"] = {f"model.layers.{LAYER}.self_attn.v_proj": {"bits": 8}}
    (fused / "config.json").write_text(json.dumps(cfg))
    out = _fails(sglang_python, fused, tmp_path / "fused")
    assert f"fused layer model.layers.{LAYER}.self_attn.qkv_proj" in out
    assert f"model.layers.{LAYER}.self_attn.v_proj: W8A16" in out


# --- the engine ------------------------------------------------------------------------------------------
# SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) imports names from sgl_kernel at module level (e.g.
# sglang/kernels/ops/kvcache/cache_move.py: from sgl_kernel import copy_all_layer_kv_cache_cpu), and PyPI has
# no CPU build of sgl-kernel.  With the engine options of engine_runner.SGLANG_CPU_OPTIONS (torch_native
# attention, pytorch sampling, no CUDA graphs) none of those kernels is called, so the engine subprocess gets a
# test-only shim (tests/engines/shims/sgl_kernel) whose names raise if called and record the call: the tests
# check that the record stays empty.
SHIMS = Path(__file__).parent / "shims"
CPU_ENGINE_MODULES = (
    "sglang.srt.entrypoints.engine", "sglang.srt.managers.scheduler", "sglang.srt.model_executor.model_runner",
    "sglang.srt.function_call.function_call_parser", "sglang.srt.models.llama",
)


def _sglang_engine_env(tmp_path) -> dict[str, str]:
    return {"PYTHONPATH": str(SHIMS), "SGLANG_USE_CPU_ENGINE": "1",
            "SGL_KERNEL_SHIM_CALLS": str(tmp_path / "sgl_kernel_calls.txt"), "AR_LOG_LEVEL": "DEBUG"}


@pytest.fixture(scope="module")
def sglang_engine_ready(sglang_python, tmp_path_factory):
    """Skips (with the import error) unless SGLang's CPU engine modules import with the sgl_kernel shim."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(_sglang_engine_env(tmp_path_factory.mktemp("sglang-probe")))
    code = "import importlib, sgl_kernel\nassert getattr(sgl_kernel, 'SHIM', False)\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in CPU_ENGINE_MODULES)
    probe = subprocess.run([sglang_python, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"SGLang's CPU engine modules do not import with the sgl_kernel shim: {last}")


def _check_engine_ran(proc, tmp_path, ckpt, scheme="W4A16 int group 128 sym", lm_head=False):
    calls = tmp_path / "sgl_kernel_calls.txt"
    assert not calls.exists(), f"sgl_kernel shim functions were called: {calls.read_text()}"
    # our method's per-layer log lines, from SGLang's scheduler process (AR_LOG_LEVEL=DEBUG): every fused layer
    layers = re.findall(r"SGLang (model\.layers\.\d+\.\S+): (.+?) on kernel (\S+)", proc.stderr)
    n = json.loads((Path(ckpt) / "config.json").read_text())["num_hidden_layers"]
    assert len({p for p, _, _ in layers}) == 4 * n, proc.stderr[-4000:]  # qkv, o, gate_up, down of each block
    assert {s for _, s, _ in layers} == {scheme}, layers
    head = re.findall(r"SGLang lm_head: (.+?) on kernel (\S+)", proc.stderr)
    assert bool(head) == lm_head, head
    if lm_head:
        assert head[0][0] == scheme, head


def _sglang_greedy(sglang_python, ckpt, prompt_ids, tmp_path, *args, dtype="float32"):
    out = tmp_path / f"sglang-{dtype}.json"
    proc = run_engine(sglang_python, "sglang-generate", "--model", ckpt, "--ids", prompt_ids, "--out", out,
                      "--dtype", dtype, *args, env_extra=_sglang_engine_env(tmp_path))
    result = json.loads(out.read_text())
    assert result["quant_method"] == "auto-round"
    return proc, result


def test_sglang_engine_generates_like_transformers(sglang_python, sglang_engine_ready, ours_w4a16, prompt_ids,
                                                   tmp_path):
    proc, result = _sglang_greedy(sglang_python, ours_w4a16, prompt_ids, tmp_path)
    _check_engine_ran(proc, tmp_path, ours_w4a16)
    assert_same_tokens(result["tokens"], transformers_greedy(ours_w4a16, prompt_ids), "SGLang, our checkpoint")


def test_sglang_engine_intel_checkpoint_like_transformers(sglang_python, sglang_engine_ready, intel_w4a16,
                                                          prompt_ids, tmp_path):
    proc, result = _sglang_greedy(sglang_python, intel_w4a16, prompt_ids, tmp_path)
    _check_engine_ran(proc, tmp_path, intel_w4a16)
    assert_same_tokens(result["tokens"], transformers_greedy(intel_w4a16, prompt_ids), "SGLang, Intel's checkpoint")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sglang_engine_half_dtypes(sglang_python, sglang_engine_ready, ours_w4a16, prompt_ids, tmp_path, dtype):
    """16-bit activations run on our kernels (numerics differ from fp32, so the check is that the text stays
    sensible: the fp32 model, teacher-forced on the engine's tokens, ranks them first)."""
    proc, result = _sglang_greedy(sglang_python, ours_w4a16, prompt_ids, tmp_path, dtype=dtype)
    _check_engine_ran(proc, tmp_path, ours_w4a16)
    assert_sensible_half_output(ours_w4a16, prompt_ids, result["tokens"], f"SGLang {dtype}")


def test_sglang_engine_quantized_lm_head(sglang_python, sglang_engine_ready, tmp_path):
    """A W4 lm_head loads and runs on our kernel (SGLang's logits processor calls our method's apply)."""
    ckpt = tiny_checkpoint_with_quantized_lm_head(tmp_path / "tiny-qhead")
    ids = tiny_prompt_ids(tmp_path)
    proc, result = _sglang_greedy(sglang_python, ckpt, ids, tmp_path, "--skip_tokenizer")
    _check_engine_ran(proc, tmp_path, ckpt, scheme="W4A16 int group 32 sym", lm_head=True)
    assert_same_tokens(result["tokens"], transformers_greedy(ckpt, ids), "SGLang, quantized lm_head")


def test_sglang_engine_openai_server(sglang_python, sglang_engine_ready, ours_w4a16, prompt_ids, tmp_path):
    """SGLang's HTTP server (the same CPU options as engine_runner.SGLANG_CPU_OPTIONS) answers /v1/completions."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(_sglang_engine_env(tmp_path))
    check_openai_server(
        [sglang_python, "-m", "sglang.launch_server", "--model-path", str(ours_w4a16), "--host", "127.0.0.1",
         "--port", "PORT", "--dtype", "float32", "--device", "cpu", "--attention-backend", "torch_native",
         "--sampling-backend", "pytorch", "--disable-cuda-graph", "--context-length", "256",
         "--max-total-tokens", "2048", "--max-running-requests", "8", "--mem-fraction-static", "0.5",
         "--random-seed", "0", "--served-model-name", "smollm2-w4a16"],
        env, tmp_path / "server.log", ours_w4a16, prompt_ids,
    )
    calls = tmp_path / "sgl_kernel_calls.txt"
    assert not calls.exists(), f"sgl_kernel shim functions were called: {calls.read_text()}"
    assert "W4A16 int group 128 sym on kernel" in (tmp_path / "server.log").read_text()  # our method's layers
