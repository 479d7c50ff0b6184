"""``device_map`` naming several devices, on a GPU machine: a block's layers tuned on the devices the map gives
them (``devices.placed``), against the same run on one GPU.  With one GPU the map mixes it with the CPU
(``{"mlp": "cpu", "self_attn": 0}``: the MLPs tuned in host memory); with two or more, ``"0,1"`` spreads each
block's layers over both.  The numbers differ from the one-GPU run only by where the products ran (CPU and GPU
float32 kernels round differently), so the integer codes are compared with a tolerance and the tuned model's
error against the float model must stay that of the one-GPU run.

Skipped without a CUDA device (CI has none).  ``python -m pytest -q tests/device/test_device_map.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arhelpers import tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CALIB = [torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
RUN = dict(dataset=CALIB, nsamples=16, seqlen=64, batch_size=4, amp=False, low_cpu_mem_usage=False)
EVAL = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(hidden=128, inter=320, layers=3).save_pretrained(path)
    return str(path)


def run(folder, device_map, **kw):
    from autoround import AutoRound

    ar = AutoRound(folder, device_map=device_map, **{**RUN, **kw})
    model, _ = ar.quantize()
    codes = {n: layer.weight.qweight.cpu() for n, layer in ar.pipeline.layers.items()}
    return ar, model, codes


def logits_error(folder, model):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = model.to("cpu").eval()
    with torch.no_grad():
        return (model(EVAL).logits - ref(EVAL).logits).pow(2).mean().item()


def same_share(a, b):
    equal = sum(int((a[n] == b[n]).sum()) for n in a)
    return equal / sum(a[n].numel() for n in a)


def several_maps():
    maps = [{"mlp": "cpu", "self_attn": 0}]
    if torch.cuda.device_count() > 1:
        maps.append("0,1")
    return maps


@pytest.mark.parametrize("device_map", several_maps(), ids=str)
@pytest.mark.parametrize("iters", [0, 8])
def test_several_devices_match_one_gpu(folder, device_map, iters):
    _, one, codes_one = run(folder, "cuda:0", iters=iters)
    err_one = logits_error(folder, one)
    ar, several, codes = run(folder, device_map, iters=iters)
    assert ar.pipeline.placement.several
    assert all(p.device.type == "cpu" for p in several.parameters())  # the model is back in host memory
    assert not any(hasattr(m, "_hf_hook") for m in several.modules())
    assert sorted(codes) == sorted(codes_one)
    share = same_share(codes, codes_one)
    assert share >= (0.995 if iters == 0 else 0.95), share
    assert logits_error(folder, several) <= 1.2 * err_one + 1e-6


def test_checkpoint_of_a_several_device_run_loads(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from autoround import AutoRound

    out = tmp_path / "q"
    AutoRound(folder, device_map={"mlp": "cpu", "self_attn": 0}, **{**RUN, "iters": 4}).quantize_and_save(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    with torch.no_grad():
        assert torch.isfinite(model(EVAL).logits).all()
