"""Fixtures of the conformance suite: a tiny Llama folder with SmolLM2's tokenizer (real tokenizer, tiny weights)."""

from __future__ import annotations

import pytest

from arhelpers import tiny_llama


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, smollm2_folder):
    """A 2-block Llama of width 128 (one 128-wide group per row, two in the MLP's down projection) saved with the
    real SmolLM2 tokenizer, so that calibration, chat templates and lm-eval see real text."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("conformance") / "tiny"
    tiny_llama(hidden=128, inter=256, layers=2, vocab=49152, seed=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def calib_json(tmp_path_factory):
    """A local JSON calibration file, as the guide's ``./tmp.json``."""
    import json

    from autoround.quantizer.data import wikipedia_articles

    path = tmp_path_factory.mktemp("calib") / "tmp.json"
    path.write_text(json.dumps([{"text": t} for t in wikipedia_articles()[:8]]))
    return str(path)


@pytest.fixture(scope="session")
def rtn_checkpoint(tmp_path_factory, model_dir):
    """A plain-RTN W4A16 auto_round checkpoint of the tiny model, for the evaluation and loading usages."""
    from autoround.quantizer.cli import main

    out = str(tmp_path_factory.mktemp("rtn") / "ckpt")
    assert main([model_dir, "--scheme", "W4A16", "--iters", "0", "--disable_opt_rtn", "--output_dir", out]) == 0
    return out
