"""Fixtures for the engine tests: SmolLM2 W4A16 checkpoints (ours and Intel's) and the prompts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from engine_helpers import PEER_SCRIPT, PROMPTS


@pytest.fixture(scope="session")
def ours_w4a16(smollm2_folder, tmp_path_factory):
    from autoround import AutoRound

    out = tmp_path_factory.mktemp("engines") / "ours-w4a16"
    ar = AutoRound(str(smollm2_folder), scheme="W4A16", iters=0, disable_opt_rtn=True)
    ar.quantize_and_save(str(out), format="auto_round")
    return out


@pytest.fixture(scope="session")
def intel_w4a16(smollm2_folder, tmp_path_factory):
    peer = os.environ.get("AR_TEST_PEER_PYTHON")
    if not peer:
        pytest.skip("AR_TEST_PEER_PYTHON is not set (Intel's auto-round virtualenv, built by .ci/run)")
    out = tmp_path_factory.mktemp("engines-intel") / "intel-w4a16"
    subprocess.run(
        [peer, str(PEER_SCRIPT), "--threads", "2", "quantize", "--model", str(smollm2_folder), "--out", str(out),
         "--bits", "4", "--group_size", "128", "--iters", "0", "--disable_opt_rtn"],
        check=True, capture_output=True, text=True, timeout=1800,
    )
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "auto-round" and cfg["packing_format"] == "auto_round:auto_gptq"
    assert cfg.get("autoround_version", "").startswith("0.16")  # really written by Intel's tool
    return out


@pytest.fixture(scope="session")
def prompt_ids(smollm2_folder, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    path = tmp_path_factory.mktemp("prompts") / "ids.json"
    path.write_text(json.dumps(ids))
    return path


@pytest.fixture(scope="session")
def ours_autoscheme(smollm2_folder, tmp_path_factory):
    """SmolLM2 with AutoScheme at 5 bits over W4A16 and W8A16: a mixed-bit auto_round checkpoint whose fused
    layers (q/k/v, gate/up) share one choice, as the engines require."""
    from autoround import AutoRound, AutoScheme
    from autoround.quantizer.data import wikipedia_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    ids = tok(wikipedia_text()[:20000], add_special_tokens=False)["input_ids"]
    calib = [ids[i : i + 128] for i in range(0, 4 * 128, 128)]
    out = tmp_path_factory.mktemp("engines") / "ours-autoscheme"
    ar = AutoRound(str(smollm2_folder), tok, scheme=AutoScheme(avg_bits=5.0, options="W4A16,W8A16", nsamples=4, seqlen=128), iters=0,
                   disable_opt_rtn=True, dataset=calib, nsamples=4, seqlen=128)
    ar.quantize_and_save(str(out), format="auto_round")
    return out

