"""lm-eval on the real SmolLM2 through the command line and the hf backend: the float model (``--eval``) and its
W4A16 RTN checkpoint (quantize, then ``--tasks``, which evaluates the folder written), on both local tasks."""

from __future__ import annotations

import json

import pytest

from autoround.quantizer import cli
from autoround.quantizer.lmeval import NEWS_TASK, RESULTS_FILE, WIKI_TASK

pytestmark = pytest.mark.slow

# the first 8 held-out Wikipedia articles (the costly task: about 1000 tokens each) and 120 news passages
WIKI_LIMIT, NEWS_LIMIT = "8", "120"


def _results(folder):
    return json.loads((folder / RESULTS_FILE).read_text())["results"]


def _eval(model, task, limit, out):
    assert cli.main(["--model", str(model), "--eval", "--tasks", task, "--limit", limit, "--eval_bs", "8",
                     "--output_dir", str(out)]) == 0
    return _results(out)[task]


@pytest.fixture(scope="module")
def scores(smollm2_folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("lmeval-smollm2")
    float_res = {WIKI_TASK: _eval(smollm2_folder, WIKI_TASK, WIKI_LIMIT, base / "float-wiki"),
                 NEWS_TASK: _eval(smollm2_folder, NEWS_TASK, NEWS_LIMIT, base / "float-news")}
    # quantize, then --tasks evaluates the checkpoint just written (results in that folder)
    ckpt = base / "w4a16"
    assert cli.main(["--model", str(smollm2_folder), "--scheme", "W4A16", "--iters", "0", "--disable_opt_rtn",
                     "--format", "auto_round", "--output_dir", str(ckpt), "--tasks", NEWS_TASK, "--limit", NEWS_LIMIT,
                     "--eval_bs", "8"]) == 0
    quant_res = {NEWS_TASK: _results(ckpt)[NEWS_TASK], WIKI_TASK: _eval(ckpt, WIKI_TASK, WIKI_LIMIT, base / "q-wiki")}
    return float_res, quant_res, base


def test_float_scores_are_a_real_models(scores):
    float_res, _, _ = scores
    wiki, news = float_res[WIKI_TASK], float_res[NEWS_TASK]
    # a 135M model on English Wikipedia: word perplexity in the tens, under a bit per byte; news last words
    # mostly but not always predicted
    assert 20 < wiki["word_perplexity,none"] < 200
    assert 0.7 < wiki["bits_per_byte,none"] < 1.2
    assert 0.2 < news["acc,none"] < 0.7
    assert news["perplexity,none"] > 1


def test_w4a16_checkpoint_scores_below_float(scores):
    float_res, quant_res, base = scores
    assert quant_res[WIKI_TASK]["word_perplexity,none"] > float_res[WIKI_TASK]["word_perplexity,none"]
    assert quant_res[WIKI_TASK]["byte_perplexity,none"] > float_res[WIKI_TASK]["byte_perplexity,none"]
    assert quant_res[NEWS_TASK]["acc,none"] < float_res[NEWS_TASK]["acc,none"]
    assert quant_res[NEWS_TASK]["perplexity,none"] > float_res[NEWS_TASK]["perplexity,none"]
    # the results file sits in the checkpoint it scored, and says so
    record = json.loads((base / "w4a16" / RESULTS_FILE).read_text())
    assert record["failed"] == {} and str(base / "w4a16") in json.dumps(record)
