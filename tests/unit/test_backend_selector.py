"""The kernel selector: declarations, priorities, forced backends, rejection lists, versioned requirements,
one install warning per model, dtype reconciliation, and the transformers loader using all of it."""

import logging
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoround import AutoRound, AutoRoundConfig
from autoround.backends import (
    InstallAdvice, KernelInfo, LayerSpec, TorchQuantLinear, backend_names, kernels, reconcile_dtype, register_kernel,
    select_kernel,
)
from autoround.backends import native_cpu
from autoround.backends.dtypes import cpu_native_half
from autoround.backends.selector import requirement_problem, unregister_kernel
from autoround.quantizer.errors import BackendError

from arhelpers import tiny_llama

CPU4 = LayerSpec("cpu", 4, 128, True, "auto_round:auto_gptq", 576, 1536)
CUDA4 = LayerSpec("cuda", 4, 128, True, "auto_round:auto_gptq", 1024, 1536, torch.float16)
AVX2_OK = native_cpu.unavailable_reason() is None
try:
    import auto_round_kernel  # noqa: F401

    HAS_ARK = True
except ImportError:
    HAS_ARK = False
try:
    import gptqmodel  # noqa: F401

    HAS_GPTQMODEL = True
except ImportError:
    HAS_GPTQMODEL = False


@pytest.fixture
def extra_kernel():
    """Register test-only kernels for one test and restore the registry afterwards."""
    added = []

    def add(**kw):
        base = dict(priority=50, devices=("cpu",), bits=(4,), packing_formats=("auto_round:auto_gptq",),
                    factory=TorchQuantLinear)
        base.update(kw)
        info = KernelInfo(**base)
        register_kernel(info)
        added.append(info.name)
        return info

    yield add
    for name in added:
        unregister_kernel(name)


def test_every_issue_kernel_is_declared():
    names = {k.name for k in kernels()}
    assert {"torch", "avx2", "ark", "marlin", "exllamav2", "triton", "hpu", "torch_int4", "torch_int8"} <= names
    assert {"ark_awq", "avx2_awq", "marlin_awq", "exllamav2_awq"} <= names
    priorities = [k.priority for k in kernels()]
    assert priorities == sorted(priorities, reverse=True)
    ark = next(k for k in kernels() if k.name == "ark")
    assert any(r.startswith("auto-round-lib>=") for r in ark.requires)
    assert all(">=" in r for k in kernels() for r in k.requires)  # requirements carry versions


@pytest.mark.skipif(not AVX2_OK, reason=f"avx2 kernel unavailable: {native_cpu.unavailable_reason()}")
def test_auto_picks_best_cpu_kernel_and_torch_for_odd_groups():
    assert select_kernel(CPU4).name == "avx2"
    assert select_kernel(replace(CPU4, bits=3)).name == "avx2"
    # not a multiple of 32: avx2 declines, ark (any group) or else the reference runs it
    assert select_kernel(replace(CPU4, group_size=16)).name == ("ark" if HAS_ARK else "torch")


def test_forced_backend_and_its_reason():
    assert select_kernel(CPU4, "torch").name == "torch"
    with pytest.raises(BackendError, match=r"backend 'marlin' cannot run this layer.*device 'cpu' not supported"):
        select_kernel(CPU4, "marlin")
    with pytest.raises(BackendError, match="unknown backend 'nope'; valid: auto, "):
        select_kernel(CPU4, "nope")
    with pytest.raises(BackendError, match="torch_int8: .*takes one group per row"):
        select_kernel(replace(CPU4, bits=8), "aten")  # alias of torch_int4 + torch_int8: both reasons listed
    assert "ark" in backend_names() and "native" in backend_names()


def test_nothing_fits_lists_every_kernel():
    spec = replace(CPU4, bits=5)
    with pytest.raises(BackendError) as err:
        select_kernel(spec)
    msg = str(err.value)
    assert msg.startswith("no kernel can run this layer (cpu, 5-bit")
    for k in kernels():
        assert f"  {k.name}: " in msg


@pytest.mark.skipif(HAS_GPTQMODEL, reason="gptqmodel is installed here")
def test_cuda_kernels_are_declared_and_need_gptqmodel():
    with pytest.raises(BackendError, match=r'pip install "gptqmodel>=2.0"'):
        select_kernel(CUDA4, "marlin")
    advice = InstallAdvice()
    assert select_kernel(CUDA4, advice=advice).name == "torch"  # the reference still runs it
    assert {"marlin", "exllamav2", "triton"} <= set(advice.missing)
    # shape and scheme constraints are checked before packages
    assert "out_features % 64" in next(k for k in kernels() if k.name == "marlin").static_reason(
        replace(CUDA4, out_features=96))
    assert "asymmetric" in next(k for k in kernels() if k.name == "marlin").static_reason(replace(CUDA4, sym=False))
    assert next(k for k in kernels() if k.name == "marlin").static_reason(replace(CUDA4, act_dtype=torch.float32))


def test_requirement_versions():
    assert requirement_problem("torch>=2.0") is None
    assert "is installed but torch>=99 is needed" in requirement_problem("torch>=99")
    assert requirement_problem("surely-not-a-package-xyz>=1.0") == "surely-not-a-package-xyz is not installed"


def test_missing_package_advice_once_per_model(extra_kernel, tmp_path, caplog):
    extra_kernel(name="fancy", requires=("surely-not-a-package-xyz>=1.2",))
    advice = InstallAdvice()
    for _ in range(3):
        select_kernel(CPU4, advice=advice)
    assert advice.layers["fancy"] == 3
    assert 'pip install "surely-not-a-package-xyz>=1.2"' in advice.message()
    # through the transformers loader: one warning for the whole model
    model = tiny_llama()
    ar = AutoRound(model, scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    logger = logging.getLogger("autoround")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="autoround"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "surely-not-a-package" in r.message]
    assert len(warnings) == 1 and "fancy (14 layers)" in warnings[0].message


def test_no_advice_for_lower_priority_or_unfit_kernels(extra_kernel):
    extra_kernel(name="low", priority=-5, requires=("surely-not-a-package-xyz>=1.0",))
    extra_kernel(name="wrongbits", bits=(2,), requires=("surely-not-a-package-xyz>=1.0",))
    advice = InstallAdvice()
    select_kernel(CPU4, advice=advice)
    assert advice.message() is None


def test_slow_kernels_are_skipped_by_auto_but_can_be_forced(extra_kernel):
    extra_kernel(name="sluggish", priority=99, slow_reason=lambda: "slow here")
    assert select_kernel(CPU4).name != "sluggish"
    assert select_kernel(CPU4, "sluggish").name == "sluggish"


def test_reconcile_dtype(extra_kernel):
    if not cpu_native_half(torch.float16):
        dtype, why = reconcile_dtype("cpu", torch.float16, CPU4)
        assert dtype == torch.float32 and "no native" in why
    assert reconcile_dtype("cpu", torch.float32, CPU4)[0] == torch.float32
    assert reconcile_dtype("hpu", torch.float32)[0] == torch.bfloat16
    extra_kernel(name="halfonly", devices=("cuda",), dtypes=(torch.float16,))
    spec = replace(CUDA4, act_dtype=torch.float32)
    assert reconcile_dtype("cuda", torch.float32, spec) == (
        torch.float16, "torch.float32 requested, the halfonly kernel computes in torch.float16")


def test_layer_spec_is_frozen_and_validated():
    with pytest.raises(Exception):
        CPU4.bits = 8
    with pytest.raises(BackendError):
        LayerSpec("cpu", 4, -7, True, "auto_round", 64, 64)


@pytest.mark.skipif(not AVX2_OK, reason=f"avx2 kernel unavailable: {native_cpu.unavailable_reason()}")
def test_loader_uses_selector_and_reconciles_fp16_on_cpu(tmp_path, caplog):
    model = tiny_llama()
    ar = AutoRound(model, scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                               quantization_config=AutoRoundConfig(backend="torch"))
    fast = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {type(m).kernel_name for m in fast.modules() if hasattr(m, "kernel_name")} == {"avx2"}
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, ref(ids).logits, atol=1e-4)
    logger = logging.getLogger("autoround")
    logger.addHandler(caplog.handler)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="autoround"):
            half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    finally:
        logger.removeHandler(caplog.handler)
    if not cpu_native_half(torch.float16):
        assert half.model.embed_tokens.weight.dtype == torch.float32
        lines = [r.message for r in caplog.records if "compute dtype" in r.message]
        assert len(lines) == 1 and "compute dtype float32" in lines[0] and "float16 requested" in lines[0]
    with pytest.raises(BackendError, match="backend 'marlin' cannot run this layer"):
        AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(backend="marlin"))


def test_a_kernel_must_subclass_the_base_class():
    with pytest.raises(TypeError, match="must be a subclass of autoround.backends.TorchQuantLinear"):
        register_kernel(KernelInfo(name="not-a-kernel", priority=1, devices=("cpu",), bits=(4,),
                                   packing_formats=("auto_round:auto_gptq",), factory=torch.nn.Linear))
    assert "not-a-kernel" not in {k.name for k in kernels()}
