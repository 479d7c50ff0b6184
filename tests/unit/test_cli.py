"""The installed console scripts, run as a user runs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arhelpers import tiny_llama


def run(*args, exe="auto-round"):
    beside = Path(sys.executable).parent / exe  # the environment running the tests, even if not on PATH
    path = str(beside) if beside.exists() else shutil.which(exe)
    assert path, f"console script {exe} is not installed"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=300)


def test_help_documents_every_option():
    r = run("-h")
    assert r.returncode == 0
    for opt in ("--model", "--scheme", "--format", "--output_dir", "--iters", "--bits", "--group_size", "--asym",
                "--nsamples", "--seqlen", "--batch_size", "--dataset", "--seed", "--disable_opt_rtn", "--eval_ppl",
                "--layer_config", "--device_map", "AR_LOG_LEVEL"):
        assert opt in r.stdout, opt


def test_autoround_alias_and_recipes():
    assert "--model" in run("-h", exe="autoround").stdout
    assert "(recipe: best)" in run("-h", exe="auto-round-best").stdout
    light = run("-h", exe="auto-round-light").stdout
    assert "(recipe: light)" in light and "default 12" in light


def test_list_format_and_scheme():
    r = run("list", "format")
    assert r.returncode == 0 and "auto_round" in r.stdout and "W4A16" in r.stdout
    r = run("list", "scheme")
    assert "W2A16G64" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/model", "--iters", "0"], "does not exist"),
    (["list", "gadgets"], "unknown list target"),
])
def test_errors_are_one_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("auto-round: error:") and msg in lines[-1]
    assert "Traceback" not in r.stderr


def test_quantize_tiny_model_end_to_end(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    r = run("--model", str(tmp_path / "m"), "--scheme", "W4A16", "--group_size", "32", "--iters", "0",
            "--disable_opt_rtn", "--format", "auto_round", "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    r = run("--model", str(tmp_path / "m"), "--bits", "5", "--iters", "0", "--disable_opt_rtn",
            "--output_dir", str(tmp_path / "out5"))
    assert r.returncode == 2 and "5-bit weights cannot be packed" in r.stderr
    assert not (tmp_path / "out5").exists()
    r = run("--model", str(tmp_path / "m"), "--scheme", "W9A16", "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "valid schemes" in r.stderr
