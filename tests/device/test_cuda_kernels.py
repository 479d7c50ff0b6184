"""CUDA kernels (torch, and gptqmodel's Triton, ExLlamaV2 and Marlin through our thin adapters) against the
torch reference computed on the CPU in float32, and the transformers loader on a CUDA device end to end.

Skipped without a CUDA device (CI has none); a kernel whose package is missing is skipped with the selector's
own reason.  On a GPU machine with gptqmodel installed: ``python -m pytest -q tests/device``.

On an offline GPU machine (python3 with torch+CUDA and triton), ``tests/device/run_on_gpu.sh`` installs wheels
carried in ``.whl/``: gptqmodel 7.7.0 (``pip wheel --no-deps gptqmodel==7.7.0``; pure Python, its CUDA kernels are
JIT-built on first use) and what it imports that such a machine lacks (transformers, datasets, dill,
multiprocess, torchao, device-smi, tokenicer, logbar, defuser; ``pip download``/``pip wheel`` for its Python).
PyPcre, a PCRE2 binding that gptqmodel imports and that builds from a git clone, is replaced by the shim in
``tests/device/shims``.  Each of these tests passed on an H200 (torch 2.11 + CUDA 13, triton 3.6), over three runs
with the adapter fixes of that session in between."""

from __future__ import annotations

import pytest
import torch

from autoround.backends import LayerSpec, TorchQuantLinear, kernels, select_kernel
from autoround.backends import conversions as cv
from autoround.quantizer.formats.packing import pack_gptq_qweight, pack_gptq_qzeros
from autoround.quantizer.qmath import group_layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPTQ, AWQ = "auto_round:auto_gptq", "auto_round:auto_awq"
# (kernel, bits, group_size, sym, packing); shapes below fit every kernel's constraints
CASES = [
    *[("torch", b, 128, s, GPTQ) for b in (2, 3, 4, 8) for s in (True, False)],
    ("torch_awq", 4, 128, False, AWQ),
    *[("triton", b, 128, s, GPTQ) for b in (2, 4, 8) for s in (True, False)],
    *[("exllamav2", 4, g, s, GPTQ) for g in (32, 128) for s in (True, False)],
    *[("marlin", b, g, True, GPTQ) for b in (4, 8) for g in (64, 128)],
    ("exllamav2_awq", 4, 128, False, AWQ),
    *[("marlin_awq", 4, 128, s, AWQ) for s in (True, False)],
]
IN_F, OUT_F = 1024, 512


def _info(name: str):
    return next(k for k in kernels() if k.name == name)


def _integers(bits, gs, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, ng = group_layout(IN_F, gs)
    q = torch.randint(0, 2**bits, (OUT_F, IN_F), generator=g)
    z = (torch.full((ng, OUT_F), 2 ** (bits - 1)) if sym
         else torch.randint(0, 2**bits, (ng, OUT_F), generator=g))
    s = torch.rand(ng, OUT_F, generator=g) * 0.02 + 0.001
    return q, z, s.half(), torch.randn(OUT_F, generator=g) * 0.1


def _fill(layer, bits, gs, sym, awq, seed=0):
    q, z, s, b = _integers(bits, gs, sym, seed)
    if awq:
        layer.qweight.copy_(cv.pack_awq_words(q.t()))
        layer.qzeros.copy_(cv.pack_awq_words(z))
    else:
        off = layer.zero_offset
        layer.qweight.copy_(pack_gptq_qweight(q, bits))
        layer.qzeros.copy_(pack_gptq_qzeros((z - off) & (2**bits - 1), bits))
    layer.scales.copy_(s)
    layer.bias.copy_(b)
    return layer


@pytest.mark.parametrize("name,bits,gs,sym,packing", CASES)
def test_cuda_kernel_matches_cpu_reference(name, bits, gs, sym, packing):
    info = _info(name)
    spec = LayerSpec("cuda", bits, gs, sym, packing, IN_F, OUT_F, torch.float16)
    ok, reason = info.can_implement(spec)
    if not ok:
        pytest.skip(f"{name}: {reason}")
    _compare(info.factory, name, bits, gs, sym, packing)


def _compare(factory, name, bits, gs, sym, packing):
    awq = packing == AWQ
    zero_offset = 0 if awq else 1
    # the reference: the same integers in GPTQ layout, on the CPU in float32
    ref = _fill(TorchQuantLinear(IN_F, OUT_F, bits, gs, sym, True, zero_offset=zero_offset), bits, gs, sym, False)
    layer = _fill(factory(IN_F, OUT_F, bits, gs, sym, bias=True, zero_offset=zero_offset), bits, gs, sym, awq)
    layer = layer.to("cuda")
    layer.post_init()
    for rows in (1, 7, 64):
        x = torch.randn(rows, IN_F, generator=torch.Generator().manual_seed(rows))
        want = ref(x)
        with torch.inference_mode():
            got = layer(x.half().cuda()).float().cpu()
        assert got.shape == want.shape
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, f"{name} {bits}-bit g{gs} {'sym' if sym else 'asym'} rows={rows}: relative error {err:.2e}"


def test_auto_prefers_device_kernels():
    spec = LayerSpec("cuda", 4, 128, True, GPTQ, IN_F, OUT_F, torch.float16)
    chosen = select_kernel(spec, "auto").name
    reasons = {k.name: k.can_implement(spec)[1] for k in kernels() if "cuda" in k.devices}
    # the best available one; torch only when gptqmodel's kernels cannot run here
    expected = next(n for n in ("marlin", "exllamav2", "triton", "torch") if reasons.get(n) == "ok")
    assert chosen == expected, reasons


@pytest.mark.parametrize("sym", [True, False])  # asym: the auto_round:auto_awq packing
def test_transformers_loads_on_cuda_like_cpu(tmp_path, sym):
    from transformers import AutoModelForCausalLM

    from autoround import AutoRound
    from arhelpers import tiny_llama

    model = tiny_llama(hidden=256, inter=512, layers=2, vocab=512, seed=3)
    out = tmp_path / "ckpt"
    AutoRound(model, scheme="W4A16", group_size=64, sym=sym, iters=0, disable_opt_rtn=True).quantize_and_save(
        str(out), format="auto_round")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    gpu = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cuda").eval()
    used = dict(gpu.hf_quantizer.used_kernels)
    print("kernels on cuda:", used)
    assert sum(used.values()) == 2 * 7 and "avx2" not in used
    with torch.inference_mode():
        want = cpu(ids).logits
        got = gpu(ids.cuda()).logits.float().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, (err, used)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
