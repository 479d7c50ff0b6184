"""Streamed tuning on a GPU: the model stays in host memory, each block is read from the files, tuned on the GPU
for its turn and dropped (``Placement.host``).  The checkpoint must equal the in-memory run on the same GPU
(the same products on the same device), and the GPU must never hold more than the modules outside the blocks,
one block and the activations.

Skipped without a CUDA device (CI has none).  ``python -m pytest -q tests/device/test_streaming_gpu.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arhelpers import tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CALIB = [torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
RUN = dict(dataset=CALIB, nsamples=16, seqlen=64, batch_size=4, amp=False, device_map="cuda:0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(hidden=256, inter=512, layers=4).save_pretrained(path)
    return str(path)


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("kw", [dict(iters=4), dict(iters=0), dict(iters=0, auto=True)],
                         ids=["signround", "opt-rtn", "autoscheme"])
def test_streamed_on_the_gpu_equals_in_memory_on_the_gpu(folder, tmp_path, kw, caplog):
    import logging

    from autoround import AutoRound, AutoScheme

    kw = dict(kw)
    if kw.pop("auto", False):
        kw["scheme"] = AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", nsamples=8, seqlen=64, batch_size=4)
    outs = []
    with caplog.at_level(logging.INFO, logger="autoround"):
        for low in (True, False):
            torch.cuda.reset_peak_memory_stats()
            ar = AutoRound(folder, low_cpu_mem_usage=low, **{**RUN, **kw})
            ar.quantize_and_save(str(tmp_path / f"low{low}"), format="auto_round")
            outs.append((tmp_path / f"low{low}", torch.cuda.max_memory_allocated()))
    assert "streamed route (low_cpu_mem_usage)" in caplog.text
    (a, peak_streamed), (b, peak_loaded) = outs
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    cfg = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert cfg(a) == cfg(b)
    assert peak_streamed < peak_loaded  # the loaded run holds every block on the GPU
