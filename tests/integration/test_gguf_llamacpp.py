"""GGUF files of the real SmolLM2-135M-Instruct, read by the programs users serve them with:

- llama.cpp (llama-cpp-python, its own virtualenv: ``AR_TEST_LLAMACPP_PYTHON``) runs our Q4_K_M and Q4_0
  files; perplexity on held-out Wikipedia text is within 2% of our fake-quantized model's;
- transformers reads the same file (``gguf_file=``) with its tokenizer, and gets the same perplexity.
"""

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound
from autoround.quantizer.data import wikipedia_text
from autoround.quantizer.eval import perplexity, windows

pytestmark = pytest.mark.slow

LLAMACPP = os.environ.get("AR_TEST_LLAMACPP_PYTHON")
SCRIPT = Path(__file__).parent.parent / "peer" / "llamacpp_ppl.py"
SEQLEN, N_WINDOWS = 512, 12


@pytest.fixture(scope="module")
def text_ids(smollm2_folder):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    text = wikipedia_text()
    calib = tok(text[: int(len(text) * 0.6)], add_special_tokens=False)["input_ids"]
    held = torch.tensor(tok(text[int(len(text) * 0.7) :], add_special_tokens=False)["input_ids"])
    return tok, [calib[i : i + 512] for i in range(0, 16 * 512, 512)], held


def llamacpp_ppl(gguf_file: str, wins: torch.Tensor, tmp_path: Path) -> float:
    if not LLAMACPP:
        pytest.skip("AR_TEST_LLAMACPP_PYTHON is not set: no virtualenv with llama-cpp-python (.ci/run builds one)")
    wfile = tmp_path / "windows.json"
    wfile.write_text(json.dumps(wins.tolist()))
    r = subprocess.run([LLAMACPP, str(SCRIPT), gguf_file, str(wfile)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["ppl"]


@pytest.mark.parametrize("fmt", ["gguf:q4_k_m", "gguf:q4_0"])
def test_llama_cpp_runs_our_gguf_with_our_perplexity(smollm2_folder, text_ids, tmp_path, fmt):
    if not LLAMACPP:
        pytest.skip("AR_TEST_LLAMACPP_PYTHON is not set: no virtualenv with llama-cpp-python (.ci/run builds one)")
    tok, calib, held = text_ids
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme=fmt.replace("gguf:", "GGUF:").upper(), iters=0, dataset=calib,
                   nsamples=16, seqlen=512)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "out"), format=fmt)
    (gguf_file,) = glob.glob(os.path.join(out, "*.gguf"))
    wins = windows(held, SEQLEN, N_WINDOWS)
    fake = perplexity(ar.model, held, seqlen=SEQLEN, n_windows=N_WINDOWS, progress=False)
    ours_in_llamacpp = llamacpp_ppl(gguf_file, wins, tmp_path)
    print(f"{fmt}: fake-quantized {fake:.4f}  llama.cpp {ours_in_llamacpp:.4f}")
    assert abs(ours_in_llamacpp / fake - 1) < 0.02
    assert 15 < fake < 40  # float is about 21 on this text


def test_transformers_reads_our_gguf_and_tokenizer(smollm2_folder, text_ids, tmp_path):
    tok, _, held = text_ids
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "q40"), format="gguf:q4_0")
    name = os.path.basename(glob.glob(os.path.join(out, "*.gguf"))[0])
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out, gguf_file=name)
    sample = "The capital of France is Paris. It has 2,148,271 inhabitants (2020)!"
    assert tok2(sample)["input_ids"] == tok(sample)["input_ids"]
    fake = perplexity(ar.model, held, seqlen=SEQLEN, n_windows=6, progress=False)
    back = perplexity(loaded, held, seqlen=SEQLEN, n_windows=6, progress=False)
    assert abs(back / fake - 1) < 0.01  # only the q8_0 (tied) embedding differs


def test_signround_q4_k_m_beats_iters0_in_llama_cpp(smollm2_folder, text_ids, tmp_path):
    """SignRound on the GGUF types themselves (iters 50) gives a Q4_K_M file with lower held-out perplexity in
    llama.cpp than the iters-0 (importance-weighted llama.cpp) quantizer on the same calibration data."""
    if not LLAMACPP:
        pytest.skip("AR_TEST_LLAMACPP_PYTHON is not set: no virtualenv with llama-cpp-python (.ci/run builds one)")
    tok, calib, held = text_ids
    wins = windows(held, SEQLEN, N_WINDOWS)
    ppl = {}
    for iters in (0, 50):
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
        ar = AutoRound(model, tok, scheme="GGUF:Q4_K_M", iters=iters, dataset=calib, nsamples=16, seqlen=256)
        _, (out,) = ar.quantize_and_save(str(tmp_path / f"iters{iters}"), format="gguf:q4_k_m")
        (gguf_file,) = glob.glob(os.path.join(out, "*.gguf"))
        ppl[iters] = llamacpp_ppl(gguf_file, wins, tmp_path)
    print(f"Q4_K_M llama.cpp perplexity: iters 0 {ppl[0]:.4f}  SignRound iters 50 {ppl[50]:.4f}")
    assert ppl[50] < ppl[0]
