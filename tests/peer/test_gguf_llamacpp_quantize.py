"""Our GGUF quantization against llama.cpp's own (llama_model_quantize, via llama-cpp-python in its own
virtualenv, ``AR_TEST_LLAMACPP_PYTHON``): for each file type, the same tensor types by the same rules, and
the reference quantizers (no importance matrix) give the same bytes."""

import glob
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from autoround import AutoRound

pytestmark = [pytest.mark.slow]

LLAMACPP = os.environ.get("AR_TEST_LLAMACPP_PYTHON")
SCRIPT = Path(__file__).with_name("llamacpp_quantize.py")
FILE_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
              "q5_k_s", "q5_k_m", "q6_k"]


def _model():
    """Hidden 256 (k-quant super-blocks fit), intermediate 320 (k-quants fall back on ffn_down rows), 8 layers
    (llama.cpp's layer-position rules), 4 heads over 1 kv head (n_gqa 4); fp16-exact weights, so that
    llama.cpp, which reads our F16 file, quantizes the very values we do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=320, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def _gguf(folder):
    (f,) = glob.glob(os.path.join(folder, "*.gguf"))
    return f


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory):
    if not LLAMACPP:
        pytest.skip("AR_TEST_LLAMACPP_PYTHON is not set: no virtualenv with llama-cpp-python (.ci/run builds one)")
    out = tmp_path_factory.mktemp("f16") / "f16"
    ar = AutoRound(_model(), scheme="BF16", iters=0)
    ar.quantize_and_save(str(out), format="gguf:f16")
    return _gguf(str(out))


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_same_types_and_bytes_as_llama_cpp(f16_file, tmp_path, ftype):
    ref_path = tmp_path / f"llamacpp-{ftype}.gguf"
    r = subprocess.run([LLAMACPP, str(SCRIPT), f16_file, str(ref_path), ftype], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ar = AutoRound(_model(), scheme=f"GGUF:{ftype.upper()}", iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ours"), format=f"gguf:{ftype}")
    ours = {t.name: t for t in gguf.GGUFReader(_gguf(out)).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(str(ref_path)).tensors}
    assert sorted(ours) == sorted(ref)
    types_ours = {n: t.tensor_type.name for n, t in ours.items()}
    types_ref = {n: t.tensor_type.name for n, t in ref.items()}
    assert types_ours == types_ref
    mismatched = []
    for name, t in ours.items():
        a, b = np.asarray(t.data).reshape(-1), np.asarray(ref[name].data).reshape(-1)
        if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
            mismatched.append(name)
    assert not mismatched, f"{len(mismatched)} tensors differ from llama.cpp's bytes: {mismatched[:5]}"
