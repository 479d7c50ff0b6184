"""torch.distributed (torchrun, gloo on this CPU): two ranks split the calibration samples and sum every tuning
step, so the checkpoint equals one process's; a rank that dies stops the others with a clear error and nothing is
written; a partial launcher environment is refused before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autoround import AutoRound
from autoround.quantizer.errors import AutoRoundError

from arhelpers import tiny_llama

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AR_DISABLE_DATASET_SUBPROCESS": "1",
       "OMP_NUM_THREADS": "1"}
for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_folder):
    """A tiny Llama with SmolLM2's tokenizer, so the CLI calibrates from text as a user's run does."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("dist") / "model"
    tiny_llama(layers=3, vocab=49152).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(path)
    return str(path)


def cli(launcher, folder, out, *extra):
    args = ["--model", folder, "--nsamples", "8", "--seqlen", "32", "--batch_size", "4", "--disable_amp",
            "--format", "auto_round", "--output_dir", str(out), *extra]
    return subprocess.run([*launcher, "-m", "autoround", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def codes_and_floats(out):
    """(4-bit codes of every packed tensor, float tensors by name) of an auto_round checkpoint."""
    t = load_file(str(Path(out) / "model.safetensors"))
    codes = {k: torch.stack([(v.view(torch.uint8) >> s) & 15 for s in (0, 4)]) for k, v in t.items()
             if v.dtype == torch.int32}
    return codes, {k: v for k, v in t.items() if v.dtype != torch.int32}


@pytest.mark.parametrize("extra, tolerance", [
    # SignRound: every step's gradients are summed over the ranks; the sum of two partial losses equals the one
    # process's batch loss up to float rounding, which could flip a gradient's sign only at an exact tie
    (["--iters", "12"], 0),
    # (slow: .ci/run's first slow group runs them) SignRoundV2 below 4 bits: the outlier filter takes the largest
    # errors of the whole batch across the ranks
    pytest.param(["--iters", "12", "--bits", "2", "--group_size", "32", "--enable_alg_ext"], 0, marks=pytest.mark.slow),
    # optimized RTN: each rank's float32 sums of squared inputs cover other batches than one process's, so an
    # importance differs in its last bits, which moves the scale search only where two ranges tie
    pytest.param(["--iters", "0"], 1e-3, marks=pytest.mark.slow),
    # AutoScheme: each rank scores its share of the batches and the scores are summed: the same choice per layer
    pytest.param(["--iters", "0", "--avg_bits", "3", "--options", "W2A16G32,W4A16"], 1e-3, marks=pytest.mark.slow),
])
def test_two_ranks_write_what_one_process_writes(folder, tmp_path, extra, tolerance):
    one = cli([sys.executable], folder, tmp_path / "one", *extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(TORCHRUN, folder, tmp_path / "two", *extra)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2 (gloo)" in two.stderr
    assert ("AutoScheme: target 3.0000 bits" if "--avg_bits" in extra else "streamed route") in two.stderr
    codes1, floats1 = codes_and_floats(tmp_path / "one")
    codes2, floats2 = codes_and_floats(tmp_path / "two")
    assert sorted(codes1) == sorted(codes2) and sorted(floats1) == sorted(floats2)
    differing = sum(int((codes1[k] != codes2[k]).sum()) for k in codes1)
    total = sum(v.numel() for v in codes1.values())
    assert differing <= tolerance * total, f"{differing} of {total} codes differ"
    for k in floats1:
        if tolerance == 0:
            assert torch.equal(floats1[k], floats2[k]), k
        else:
            torch.testing.assert_close(floats1[k], floats2[k], rtol=0.02, atol=1e-4)
    # rank 0 alone wrote: one folder, no scratch folders of either rank left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    cfg1 = json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]
    cfg2 = json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]
    assert cfg1 == cfg2


def test_a_rank_that_dies_stops_the_others_and_the_run_resumes(folder, tmp_path):
    out = tmp_path / "out"
    cfg = {"model": folder, "out": str(out), "format": "auto_round", "nsamples": 8, "die_after_blocks": 1,
           "kw": {"iters": 6, "batch_size": 4, "amp": False}}
    worker = [*TORCHRUN, str(HERE.parent / "dist_worker.py")]
    r = subprocess.run([*worker, json.dumps(cfg)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr, r.stderr[-3000:]
    # rank 0 either saw its collective fail or was stopped by the launcher: either way one line says so
    assert "torch.distributed rank 0" in r.stderr, r.stderr[-3000:]
    # no output and no scratch folder: only the resume store rank 0 keeps of the finished block
    assert [p.name for p in tmp_path.iterdir()] == [".out.autoround-resume"]
    resumed = subprocess.run([*worker, json.dumps({**cfg, "die_after_blocks": None, "resume": True})],
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "model.layers.0: loaded from the resume state" in resumed.stderr
    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    AutoRound(folder, dataset=calib, nsamples=8, seqlen=32, **cfg["kw"]).quantize_and_save(
        str(tmp_path / "one"), format="auto_round")
    codes1, floats1 = codes_and_floats(tmp_path / "one")
    codes2, floats2 = codes_and_floats(out)
    assert all(torch.equal(codes1[k], codes2[k]) for k in codes1)
    assert all(torch.equal(floats1[k], floats2[k]) for k in floats1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "out"]


def test_a_partial_launcher_environment_is_refused_before_work(folder, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(AutoRoundError, match="MASTER_ADDR, MASTER_PORT are not set: start the run with torchrun"):
        AutoRound(folder, iters=2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(AutoRoundError, match="RANK=2 is not below WORLD_SIZE=2"):
        AutoRound(folder, iters=2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is invalid"):
        AutoRound(folder, iters=2)


def test_too_few_samples_for_the_ranks_is_one_error(folder, tmp_path):
    r = cli(TORCHRUN, folder, tmp_path / "out", "--iters", "2", "--nsamples", "1", "--batch_size", "1")
    assert r.returncode != 0
    assert "1 calibration samples cannot be split across 2 ranks" in r.stderr
    assert not (tmp_path / "out").exists()
