"""lm-eval from the command line on a tiny model: the local offline tasks, the results file, task-by-task runs
with a task that cannot load, and bad input before any work."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from autoround.quantizer import cli, lmeval

from arhelpers import tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(smollm2_folder, tmp_path_factory):
    """A tiny Llama with SmolLM2's vocabulary and tokenizer (lm-eval tokenizes real text)."""
    root = tmp_path_factory.mktemp("lmeval") / "float"
    model = tiny_llama(hidden=64, inter=128, layers=2, vocab=49152)
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(str(smollm2_folder)).save_pretrained(root)
    return root


def test_local_tasks_are_built_and_registered():
    root = lmeval.task_dir()
    wiki = (root / f"{lmeval.WIKI_TASK}.jsonl").read_text().splitlines()
    news = [json.loads(x)["text"] for x in (root / f"{lmeval.NEWS_TASK}.jsonl").read_text().splitlines()]
    assert 20 <= len(wiki) <= lmeval.WIKI_DOCS and len(news) > 250
    assert all(p.split(" ")[-1].isalpha() and len(p.split(" ")[-1]) >= 4 for p in news)
    assert all(len(p.split()) <= lmeval.NEWS_MAX_WORDS for p in news)
    manager = lmeval.task_manager()
    assert set(lmeval.LOCAL_TASKS) <= set(manager.all_tasks)


def test_eval_writes_results_for_both_local_tasks(tiny_folder, tmp_path, capsys):
    out = tmp_path / "results"
    rc = cli.main(["--model", str(tiny_folder), "--eval", "--tasks", ",".join(lmeval.LOCAL_TASKS),
                   "--limit", "4", "--eval_bs", "2", "--output_dir", str(out)])
    assert rc == 0
    record = json.loads((out / lmeval.RESULTS_FILE).read_text())
    res = record["results"]
    assert record["tasks"] == list(lmeval.LOCAL_TASKS) and record["limit"] == 4 and not record["failed"]
    # a random tiny model: its word perplexity is huge and it guesses no last word
    assert res[lmeval.WIKI_TASK]["word_perplexity,none"] > 1000
    assert res[lmeval.NEWS_TASK]["acc,none"] == 0.0 and res[lmeval.NEWS_TASK]["perplexity,none"] > 1000
    assert lmeval.NEWS_TASK in capsys.readouterr().out  # lm-eval's table


def test_task_by_task_reports_a_broken_task_and_runs_the_others(tiny_folder, tmp_path):
    out = tmp_path / "results"
    # offline (the tests never reach the hub), lambada_openai cannot load its data
    rc = cli.main(["--model", str(tiny_folder), "--eval", "--tasks", f"lambada_openai,{lmeval.NEWS_TASK}",
                   "--limit", "3", "--eval_task_by_task", "--output_dir", str(out)])
    assert rc == 1
    record = json.loads((out / lmeval.RESULTS_FILE).read_text())
    assert list(record["failed"]) == ["lambada_openai"] and "ar_gensim_news_lastword" in record["failed"]["lambada_openai"]
    assert lmeval.NEWS_TASK in record["results"]


def test_offline_hub_task_fails_with_one_line(tiny_folder, tmp_path, capsys):
    rc = cli.main(["--model", str(tiny_folder), "--eval", "--tasks", "lambada_openai", "--output_dir", str(tmp_path)])
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("auto-round: error")]
    assert rc == 2 and len(ours) == 1 and "could not load its data" in ours[0] and lmeval.WIKI_TASK in ours[0]


def test_quantize_then_evaluate_the_last_format(tiny_folder, tmp_path):
    out = tmp_path / "q"
    rc = cli.main(["--model", str(tiny_folder), "--iters", "0", "--disable_opt_rtn", "--group_size", "32",
                   "--format", "fake,auto_round", "--output_dir", str(out), "--tasks", lmeval.NEWS_TASK,
                   "--limit", "3"])
    assert rc == 0
    record = json.loads((out / "auto_round" / lmeval.RESULTS_FILE).read_text())
    assert record["model"].endswith("auto_round") and lmeval.NEWS_TASK in record["results"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "lambada_opnai"], "unknown lm-eval task.*did you mean lambada_openai"),
    (["--limit", "5"], "--limit apply to lm-eval evaluation: add --tasks"),
    (["--eval", "--eval_backend", "hf", "--vllm_args", "max_model_len=512"], "--vllm_args applies to --eval_backend vllm"),
    (["--eval", "--limit", "2.5"], "neither a whole count nor a fraction"),
    (["--eval", "--eval_bs", "0"], "--eval_bs must be a positive integer"),
])
def test_bad_eval_input_refused_before_work(tiny_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    rc = cli.main(["--model", str(tiny_folder), "--output_dir", str(out), *argv])
    assert rc == 2 and not out.exists()
    import re

    assert re.search(message, capsys.readouterr().err)


def test_vllm_args_parse():
    assert lmeval.parse_kv("max_model_len=2048, enforce_eager=true,dtype=float32") == {
        "max_model_len": 2048, "enforce_eager": True, "dtype": "float32"}
    with pytest.raises(Exception, match="not key=value"):
        lmeval.parse_kv("max_model_len")


def test_default_tasks_offline_are_the_local_ones():
    assert lmeval.default_tasks() == lmeval.LOCAL_TASKS  # the tests run with HF_HUB_OFFLINE=1
    assert torch is not None


def test_vllm_backend_without_vllm_is_one_clear_error(tiny_folder, tmp_path, capsys):
    import importlib.metadata as md

    for dist, _ in lmeval.VLLM_DISTRIBUTIONS:
        try:
            md.version(dist)
            pytest.skip(f"{dist} is installed here")
        except md.PackageNotFoundError:
            pass
    rc = cli.main(["--model", str(tiny_folder), "--eval", "--tasks", lmeval.NEWS_TASK, "--eval_backend", "vllm",
                   "--output_dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs vLLM in this environment" in err and len(err.strip().splitlines()) == 1
    assert md.version is not None and md.version("torch")  # importlib.metadata left as it was
