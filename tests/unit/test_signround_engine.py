"""SignRound engine options: sampler, loss mask, gradient accumulation, early stop, lm_head, resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from autoround.quantizer.data import loss_mask
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.qmath import quantize_weight
from autoround.quantizer.resume import STATE_FILE, resume_dir_for
from autoround.quantizer.schemes import QuantScheme
from autoround.quantizer.signround import IndexSampler, SignRoundOptions, masked_mse, tune_block

from arhelpers import tiny_llama


def test_index_sampler_covers_every_sample_once_per_pass():
    s = IndexSampler(10, 4, torch.Generator().manual_seed(0))
    first_pass = torch.cat([s.next(), s.next()]).tolist()  # 8 of 10; the tail of 2 is dropped
    assert len(set(first_pass)) == 8
    assert all(len(s.next()) == 4 for _ in range(5))


def test_masked_mse_ignores_masked_positions():
    out, tgt = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    tgt[:, -1] = 100.0  # only the last position differs
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert masked_mse(out, tgt, mask).item() > 1000
    mask[:, -1] = False
    assert masked_mse(out, tgt, mask).item() == 0.0
    assert masked_mse(out, tgt, None).item() == pytest.approx(100.0**2 / 3)


def test_loss_mask_drops_last_position_and_padding():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [5, 9, 9, 9]])
    m = loss_mask(ids, pad_token_id=0)
    assert m.tolist() == [[True, True, True, False], [True, True, False, False], [True, True, True, False]]
    m = loss_mask(ids, pad_token_id=None)  # trailing repeats count as padding; their first occurrence stays
    assert m.tolist() == [[True, True, True, False], [True, True, True, False], [True, True, False, False]]


def _mlp_case():
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = mlp(x)
    names = ["gate_proj", "up_proj", "down_proj"]
    return mlp, x, y, names


def test_gradient_accumulation_equals_one_big_batch():
    mlp, x, y, names = _mlp_case()
    scheme = QuantScheme(bits=2, group_size=32)
    big = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=20, batch_size=8, amp=False))
    acc = tune_block(mlp, dict.fromkeys(names, scheme), x, y,
                     SignRoundOptions(iters=20, batch_size=4, gradient_accumulate_steps=2, amp=False))
    rtn = {n: quantize_weight(mlp.get_submodule(n).weight, 2, 32, True) for n in names}
    for n in names:
        same = (big.weights[n].qweight == acc.weights[n].qweight).float().mean().item()
        moved = (big.weights[n].qweight != rtn[n].qweight).float().mean().item()
        assert same > 0.99 and moved > 0.01  # same steps (up to float summation order), and real steps


def test_dynamic_max_gap_stops_a_stalled_block():
    mlp, x, y, names = _mlp_case()
    seen = []
    tune_block(mlp, dict.fromkeys(names, QuantScheme(bits=4, group_size=32)), x, y,
               SignRoundOptions(iters=400, batch_size=8, lr=1e-6, dynamic_max_gap=5),
               progress=lambda it, loss, best: seen.append(it))
    assert 5 <= len(seen) < 400


def test_loss_mask_changes_what_is_tuned():
    mlp, x, y, names = _mlp_case()
    scheme = QuantScheme(bits=2, group_size=32)
    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[:, :2] = True
    plain = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=10, batch_size=8))
    masked = tune_block(mlp, dict.fromkeys(names, scheme), x, y, SignRoundOptions(iters=10, batch_size=8),
                        loss_mask=mask)
    assert any(not torch.equal(plain.weights[n].qweight, masked.weights[n].qweight) for n in names)


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="gradient_accumulate_steps"):
        SignRoundOptions(iters=5, gradient_accumulate_steps=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        SignRoundOptions(iters=5, lr=-1.0)


def _calib(n=16, seqlen=32):
    return [torch.randint(0, 256, (seqlen,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_quant_lm_head_tunes_the_output_projection():
    from autoround import AutoRound

    ar = AutoRound(tiny_llama(), scheme="W2A16G32", iters=10, dataset=_calib(), nsamples=16, seqlen=32,
                   batch_size=4, quant_lm_head=True)
    ar.quantize()
    assert "lm_head" in ar.layers
    qw = ar.layers["lm_head"].weight
    assert torch.equal(ar.model.lm_head.weight, qw.dequantize())


def test_quant_lm_head_tied_is_untied_and_tuned():
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoround import AutoRound

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    emb = model.get_input_embeddings().weight.detach().clone()
    ar = AutoRound(model, scheme="W2A16G32", iters=5, dataset=_calib(), nsamples=16, seqlen=32, batch_size=4,
                   quant_lm_head=True)
    ar.quantize()
    assert "lm_head" in ar.layers
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the embedding stays float
    assert torch.equal(model.lm_head.weight, ar.layers["lm_head"].weight.dequantize())


def test_bad_tuning_option_is_a_clear_error():
    from autoround import AutoRound

    with pytest.raises(AutoRoundError, match="gradient_accumulate_steps"):  # refused when constructed, before work
        AutoRound(tiny_llama(), iters=2, dataset=_calib(), nsamples=16, seqlen=32, gradient_accumulate_steps=0)
    with pytest.raises(AutoRoundError, match="init_range must be one of minmax, search, auto, got 'best'"):
        AutoRound(tiny_llama(), iters=2, init_range="best")


# -- resume ---------------------------------------------------------------------------------------------------

RUN = textwrap.dedent(
    """
    import sys, torch
    from autoround import AutoRound
    model, calib, out, resume, iters = sys.argv[1:6]
    # amp fixed: left on, each process times bf16 against float32 to decide it, and under load two processes
    # may decide differently (a resume across that is refused, tested below)
    ar = AutoRound(model, scheme="W2A16G32", iters=int(iters), dataset=list(torch.load(calib)), nsamples=8,
                   seqlen=32, batch_size=4, amp=False)
    ar.quantize_and_save(out, resume=resume == "1")
    """
)


def _tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_resume_after_a_kill_gives_the_uninterrupted_checkpoint(tmp_path):
    model_dir, calib = tmp_path / "model", tmp_path / "calib.pt"
    tiny_llama(layers=4).save_pretrained(model_dir)
    torch.save(torch.stack(_calib(8)), calib)
    script = tmp_path / "run.py"
    script.write_text(RUN)
    iters = "40"

    def run(out, resume):
        return [sys.executable, str(script), str(model_dir), str(calib), str(out), resume, iters]

    ref = tmp_path / "ref"
    subprocess.run(run(ref, "0"), check=True, capture_output=True)
    assert not resume_dir_for(ref).exists()  # cleaned up after a successful save

    out = tmp_path / "out"
    # an older checkpoint in the output folder must survive the killed run untouched
    subprocess.run(["cp", "-r", str(ref), str(out)], check=True)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    state = resume_dir_for(out) / STATE_FILE
    proc = subprocess.Popen(run(out, "0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            finished = json.loads(state.read_text())["finished"]
            if finished:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted; raise iters"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = json.loads(state.read_text())["finished"]
    assert 1 <= len(finished) < 4, finished
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    done = subprocess.run(run(out, "1"), check=True, capture_output=True, text=True)
    assert "resuming: " in done.stderr
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not resume_dir_for(out).exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    from autoround import AutoRound

    out = tmp_path / "out"
    ar = AutoRound(tiny_llama(), scheme="W2A16G32", iters=3, dataset=_calib(), nsamples=16, seqlen=32, batch_size=4)
    ar.resume_dir, ar.resume = str(out), False
    ar.quantize()  # leaves the state behind, as an interrupted run would
    assert (resume_dir_for(out) / STATE_FILE).exists()
    other = AutoRound(tiny_llama(), scheme="W2A16G32", iters=4, dataset=_calib(), nsamples=16, seqlen=32,
                      batch_size=4)
    with pytest.raises(AutoRoundError, match="other settings.*iters"):
        other.quantize_and_save(str(out), resume=True)


def test_resume_across_amp_policies_is_refused(tmp_path):
    """The resume fingerprint holds amp as the run resolved it: blocks tuned without amp are not mixed into a
    run that tunes under bf16 autocast (where this CPU's bf16 is fast enough for amp to stay on)."""
    from autoround import AutoRound
    from autoround.quantizer.block_runner import CPU_BF16_SLOWDOWN_LIMIT, cpu_matmul_seconds

    out = tmp_path / "out"

    def make(**kw):
        return AutoRound(tiny_llama(), scheme="W2A16G32", iters=3, dataset=_calib(), nsamples=16, seqlen=32,
                         batch_size=4, **kw)

    ar = make(amp=False)
    ar.resume_dir, ar.resume = str(out), False
    ar.quantize()
    t_bf16, t_fp32 = cpu_matmul_seconds()
    if t_bf16 > CPU_BF16_SLOWDOWN_LIMIT * t_fp32:  # amp resolves to off here: the same settings, so it resumes
        make(amp=True).quantize_and_save(str(out), resume=True)
        assert not resume_dir_for(out).exists()
    else:
        with pytest.raises(AutoRoundError, match="other settings.*amp"):
            make(amp=True).quantize_and_save(str(out), resume=True)


def test_model_digest_tells_models_apart():
    from autoround.quantizer.resume import model_digest

    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert model_digest(a) == model_digest(b)
    assert model_digest(a) != model_digest(tiny_llama(seed=1))
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, :8] += 1.0  # inside the first sampled run of that tensor
    assert model_digest(a) != model_digest(b)


def test_cpu_amp_is_refused_where_bf16_matmuls_are_slow(caplog):
    """amp (the default) tunes under bf16 autocast only on a CPU whose bf16 matmuls are not much slower than its
    float32 ones; where they are, it warns with the measured times and tunes exactly as amp=False does."""
    import logging

    from autoround import AutoRound
    from autoround.log import logger
    from autoround.quantizer.block_runner import CPU_BF16_SLOWDOWN_LIMIT, cpu_matmul_seconds

    t_bf16, t_fp32 = cpu_matmul_seconds()
    assert t_bf16 > 0 and t_fp32 > 0
    slow = t_bf16 > CPU_BF16_SLOWDOWN_LIMIT * t_fp32

    def run(**kw):
        ar = AutoRound(tiny_llama(), scheme="W4A16", group_size=32, iters=3, dataset=_calib(), nsamples=8, seqlen=32,
                       batch_size=4, **kw)
        ar.quantize()
        return {name: layer.weight.qweight for name, layer in ar.layers.items()}

    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="autoround"):
            with_amp = run()
    finally:
        logger.removeHandler(caplog.handler)
    refusals = [r.message for r in caplog.records if r.message.startswith("amp: bfloat16 matmuls run")]
    assert len(refusals) == (1 if slow else 0), (t_bf16, t_fp32, refusals)
    if slow:
        assert "--disable_amp" in refusals[0]
        without = run(amp=False)
        assert with_amp.keys() == without.keys()
        assert all(torch.equal(with_amp[k], without[k]) for k in with_amp)
