"""Checkpoint pins: plain RTN, optimized RTN and a short SignRound write the same bytes, in every format, as
they did when the pins were taken (``checkpoint_pins.json``, written by the code before a restructuring).

A pin is the SHA-256 of every file of the output folder. Float reductions may round differently on another
CPU, torch build or transformers release, so the pins hold where they were taken: elsewhere the test says so
and skips. Re-take them only from a commit whose checkpoints are trusted:
``python tests/unit/test_checkpoint_pins.py --write`` (``--slow`` adds the SmolLM2 cases).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

PINS = Path(__file__).with_name("checkpoint_pins.json")

# (case, method, scheme keywords, format); the tiny model is 2 Llama blocks of width 256, so GGUF's
# 256-wide super-blocks fit
TINY_CASES = [
    ("rtn-w4g32-auto_round", "rtn", {"scheme": "W4A16", "group_size": 32}, "auto_round"),
    ("rtn-w4g32-auto_gptq", "rtn", {"scheme": "W4A16", "group_size": 32}, "auto_gptq"),
    ("rtn-w4g32asym-auto_awq", "rtn", {"scheme": "W4A16", "group_size": 32, "sym": False}, "auto_awq"),
    ("rtn-w4g32-llm_compressor", "rtn", {"scheme": "W4A16", "group_size": 32}, "llm_compressor"),
    ("rtn-w4g32-fake", "rtn", {"scheme": "W4A16", "group_size": 32}, "fake"),
    ("rtn-q4_0-gguf", "rtn", {"scheme": "GGUF:Q4_0"}, "gguf:q4_0"),
    ("rtn-folder-w4g32-auto_round", "rtn-folder", {"scheme": "W4A16", "group_size": 32}, "auto_round"),
    ("optrtn-w4g32-auto_round", "opt_rtn", {"scheme": "W4A16", "group_size": 32}, "auto_round"),
    ("optrtn-w2g32asym-auto_round", "opt_rtn", {"scheme": "W2A16G32", "sym": False}, "auto_round"),
    ("optrtn-w4g32-auto_gptq", "opt_rtn", {"scheme": "W4A16", "group_size": 32}, "auto_gptq"),
    ("optrtn-q4_k_m-gguf", "opt_rtn", {"scheme": "GGUF:Q4_K_M"}, "gguf:q4_k_m"),
    ("signround-w4g32-auto_round", "signround", {"scheme": "W4A16", "group_size": 32}, "auto_round"),
    ("signround-w4g32asym-auto_awq", "signround", {"scheme": "W4A16", "group_size": 32, "sym": False}, "auto_awq"),
    ("signround-w2g32-auto_gptq", "signround", {"scheme": "W2A16G32"}, "auto_gptq"),
    ("signround-w4g32-llm_compressor", "signround", {"scheme": "W4A16", "group_size": 32}, "llm_compressor"),
    ("signround-w4g32-fake", "signround", {"scheme": "W4A16", "group_size": 32}, "fake"),
    ("signround-q4_k_m-gguf", "signround", {"scheme": "GGUF:Q4_K_M"}, "gguf:q4_k_m"),
]
# SmolLM2 W4A16 g128 in each integer format (slow)
SMOL_FORMATS = ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]
SMOL_CASES = [
    (f"smol-{method}-w4g128{'asym' if fmt == 'auto_awq' else ''}-{fmt}", method,
     {"scheme": "W4A16", "group_size": 128, **({"sym": False} if fmt == "auto_awq" else {})}, fmt)
    for method in ("rtn", "opt_rtn", "signround") for fmt in SMOL_FORMATS
]
METHODS = {
    "rtn": {"iters": 0, "disable_opt_rtn": True},
    "rtn-folder": {"iters": 0, "disable_opt_rtn": True},
    "opt_rtn": {"iters": 0},
    "signround": {"iters": 5, "amp": False},
}


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    import transformers

    # transformers too: its model code (norms, attention) sets the activations that optimized RTN and SignRound
    # see, and a new release rounds them otherwise (5.25 moved 5 of the tiny pins taken under 5.24)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _tiny_calib():
    return [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def build(case: tuple, workdir: Path, smol_folder: str | None = None) -> dict[str, str]:
    from autoround import AutoRound

    from arhelpers import tiny_llama

    name, method, scheme, fmt = case
    kw = dict(METHODS[method], **scheme)
    if smol_folder is not None:
        model, data = smol_folder, None
        kw.update(nsamples=8, seqlen=128, batch_size=4)
    else:
        model = tiny_llama(hidden=256, inter=512, layers=2, vocab=256)
        data = _tiny_calib()
        kw.update(nsamples=8, seqlen=32, batch_size=4)
        if method == "rtn-folder":
            src = workdir / f"{name}-src"
            model.save_pretrained(src)
            model = str(src)
    if data is not None:
        kw["dataset"] = data
    torch.manual_seed(0)
    ar = AutoRound(model, **kw)
    out = workdir / name
    _, folders = ar.quantize_and_save(str(out), format=fmt)
    return folder_hashes(Path(folders[0]))


def _pins() -> dict:
    if not PINS.exists():
        pytest.skip(f"{PINS.name} is missing")
    pins = json.loads(PINS.read_text())
    if pins["machine"] != machine():
        pytest.skip(f"pins were taken on {pins['machine']}, this is {machine()}: float reductions may round "
                    "otherwise here; re-take them from a trusted commit (see this file's docstring)")
    return pins


@pytest.mark.parametrize("case", TINY_CASES, ids=[c[0] for c in TINY_CASES])
def test_tiny_checkpoint_bytes_are_pinned(case, tmp_path):
    pins = _pins()
    assert build(case, tmp_path) == pins["cases"][case[0]]


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOL_CASES, ids=[c[0] for c in SMOL_CASES])
def test_smollm2_checkpoint_bytes_are_pinned(case, tmp_path, smollm2_folder):
    pins = _pins()
    if case[0] not in pins["cases"]:
        pytest.skip(f"no pin for {case[0]}")
    assert build(case, tmp_path, smol_folder=smollm2_folder) == pins["cases"][case[0]]


def _write(slow: bool) -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    cases = {}
    old = json.loads(PINS.read_text())["cases"] if PINS.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in TINY_CASES:
            cases[case[0]] = build(case, Path(tmp))
            print(case[0], flush=True)
        if slow:
            from autoround.quantizer.assets import smollm2_folder

            for case in SMOL_CASES:
                cases[case[0]] = build(case, Path(tmp), smol_folder=smollm2_folder())
                print(case[0], flush=True)
        else:
            cases.update({k: v for k, v in old.items() if k.startswith("smol-")})
    PINS.write_text(json.dumps({"machine": machine(), "cases": cases}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("AR_DISABLE_DATASET_SUBPROCESS", "1")
    _write("--slow" in sys.argv)
