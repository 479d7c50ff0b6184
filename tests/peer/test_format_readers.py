"""Our exports read by the tools that serve them, and their checkpoints read by us, for real.

- ``auto_gptq`` and ``auto_awq`` through GPTQModel's CPU torch kernels (``AR_TEST_GPTQMODEL_PYTHON``: its own
  virtualenv, it needs torch >= 2.14.1), logits against our dequantized model;
- GPTQ and AWQ checkpoints quantized by GPTQModel through our ``AutoRoundConfig`` loader;
- ``auto_round`` with the ``auto_round:auto_awq`` packing through Intel's auto-round, whose CPU backend for it
  is GPTQModel's AWQ kernel: Intel's package is installed in the GPTQModel virtualenv.
(``llm_compressor`` through compressed-tensors runs in the default suite: tests/unit/test_formats.py.)
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound, AutoRoundConfig
from autoround.backends import TorchQuantLinear
from autoround.quantizer.data import wikipedia_text


pytestmark = [pytest.mark.peer, pytest.mark.slow]

GPTQMODEL = os.environ.get("AR_TEST_GPTQMODEL_PYTHON")
HERE = Path(__file__).parent


def run_peer(python, env_name, *args, timeout=1200):
    if not python:
        pytest.skip(f"{env_name} is not set: no virtualenv with the reader")
    r = subprocess.run([python, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def gptqmodel(*args):
    return run_peer(GPTQMODEL, "AR_TEST_GPTQMODEL_PYTHON", HERE / "gptqmodel_peer.py", *args)


def assert_close(ours, theirs, label):
    """GPTQModel runs float16 here (our peer script asks for it), we float32: fp16 tolerance."""
    ours, theirs = ours.float(), theirs.float()
    diff = (ours - theirs).abs()
    scale = ours.abs().max().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"{label}: max |diff| {diff.max().item():.4f} mean {diff.mean().item():.4f} (max |logit| {scale:.2f}), "
          f"top-1 agreement {top1:.3f}")
    assert diff.max().item() <= 0.01 * scale + 0.02 and top1 >= 0.95, label


def tiny_llama():
    """Every output dimension a multiple of 64 (GPTQModel's AWQ quantizer batches output channels by 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(smollm2_folder, tmp_path_factory):
    """A tiny Llama (all shapes packable) saved with SmolLM2's tokenizer (GPTQModel wants one)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    model = tiny_llama()
    model.save_pretrained(root / "float")
    tok.save_pretrained(root / "float")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.save(ids, root / "ids.pt")
    return root, tok, ids


def test_gptqmodel_reads_our_gptq_and_awq(tiny):
    root, tok, ids = tiny
    # GPTQ: symmetric, one layer per block at 8 bits through a GPTQModel `dynamic` entry
    ar = AutoRound(tiny_llama(), tok, group_size=32, iters=0, disable_opt_rtn=True,
                   layer_config={"mlp.down_proj": {"bits": 8}})
    _, (gptq,) = ar.quantize_and_save(str(root / "ours-gptq"), format="auto_gptq")
    with torch.no_grad():
        ref = ar.model(ids).logits
    out = json.loads(gptqmodel("logits", gptq, "gptq_torch", root / "ids.pt", root / "gptq.pt").splitlines()[-1])
    assert out["kernels"] == ["TorchLinear"]
    assert_close(ref, torch.load(root / "gptq.pt")["logits"], "auto_gptq via GPTQModel")
    # AWQ: asymmetric 4-bit
    ar = AutoRound(tiny_llama(), tok, group_size=32, sym=False, iters=0, disable_opt_rtn=True)
    _, (awq,) = ar.quantize_and_save(str(root / "ours-awq"), format="auto_awq")
    with torch.no_grad():
        ref = ar.model(ids).logits
    out = json.loads(gptqmodel("logits", awq, "awq_torch", root / "ids.pt", root / "awq.pt").splitlines()[-1])
    assert out["kernels"] == ["AwqTorchLinear"]
    assert_close(ref, torch.load(root / "awq.pt")["logits"], "auto_awq via GPTQModel")


@pytest.mark.parametrize("method,backend", [("gptq", "gptq_torch"), ("awq", "awq_torch")])
def test_gptqmodel_checkpoints_load_through_ours(tiny, method, backend):
    root, _, ids = tiny
    ckpt = root / f"gptqmodel-{method}"
    gptqmodel("quantize", root / "float", method, ckpt)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == method
    gptqmodel("logits", ckpt, backend, root / "ids.pt", root / f"theirs-{method}.pt")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), quantization_config=AutoRoundConfig(),
                                                 dtype=torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    # whichever kernel auto picks on this machine, it reads the checkpoint's packing layout
    assert isinstance(layer, TorchQuantLinear) and layer.kernel_name.endswith("awq") == (method == "awq")
    with torch.no_grad():
        ours = model(ids).logits
    assert_close(ours, torch.load(root / f"theirs-{method}.pt")["logits"], f"GPTQModel {method} via our loader")


@pytest.fixture(scope="module")
def smollm2(smollm2_folder, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    text = wikipedia_text()
    ids = tok(text[int(len(text) * 0.7):], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids[i * 32:(i + 1) * 32] for i in range(4)])
    root = tmp_path_factory.mktemp("smollm2")
    torch.save(ids, root / "ids.pt")
    return root, tok, ids


def test_gptqmodel_reads_smollm2_exports(smollm2_folder, smollm2):
    root, tok, ids = smollm2
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="W4A16", sym=False, group_size=64, iters=0, disable_opt_rtn=True)
    _, folders = ar.quantize_and_save(str(root / "ours"), format="auto_gptq,auto_awq")
    with torch.no_grad():
        ref = ar.model(ids).logits
    for folder, backend in zip(folders, ("gptq_torch", "awq_torch")):
        if backend == "gptq_torch":
            continue  # GPTQModel refuses asymmetric GPTQ v1 files not written by itself (see test below)
        gptqmodel("logits", folder, backend, root / "ids.pt", root / "theirs.pt")
        assert_close(ref, torch.load(root / "theirs.pt")["logits"], f"SmolLM2 {os.path.basename(folder)}")
    ar = AutoRound(AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval(), tok,
                   scheme="W4A16", group_size=64, iters=0, disable_opt_rtn=True)
    _, (gptq,) = ar.quantize_and_save(str(root / "ours-sym"), format="auto_gptq")
    with torch.no_grad():
        ref = ar.model(ids).logits
    gptqmodel("logits", gptq, "gptq_torch", root / "ids.pt", root / "theirs.pt")
    assert_close(ref, torch.load(root / "theirs.pt")["logits"], "SmolLM2 auto_gptq")


def test_intel_reads_auto_round_awq_packing(smollm2_folder, smollm2):
    root, tok, ids = smollm2
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="W4A16", sym=False, group_size=64, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(root / "ours-ar-awq"), format="auto_round")
    assert json.loads(Path(out, "config.json").read_text())["quantization_config"]["packing_format"] == \
        "auto_round:auto_awq"
    ids_json = root / "ids.json"
    ids_json.write_text(json.dumps(ids.tolist()))
    # Intel's CPU backend for this packing is GPTQModel's AWQ torch kernel ("gptqmodel:awq_torch"), so
    # Intel's auto-round runs in the GPTQModel virtualenv (.ci/run installs it there)
    run_peer(GPTQMODEL, "AR_TEST_GPTQMODEL_PYTHON", HERE / "intel_autoround.py", "logits", "--ckpt", out, "--ids", ids_json,
             "--out", root / "intel.pt")
    theirs = torch.load(root / "intel.pt")
    with torch.no_grad():
        ref = ar.model(ids).logits
    assert "gptqmodel:awq_torch" in theirs["backend_info"]
    assert_close(ref, theirs["logits"], "auto_round:auto_awq via Intel's auto-round")
