"""Every CPU kernel we ship runs SmolLM2 W4 group 128 (576 input channels: the last group is ragged) and
agrees with the torch reference kernel on the real model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoround import AutoRound, AutoRoundConfig
from autoround.backends import native_cpu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w4g128(smollm2_folder, tmp_path_factory):
    ar = AutoRound(str(smollm2_folder), scheme="W4A16", group_size=128, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path_factory.mktemp("w4g128") / "ckpt"), format="auto_round")
    return out


def _logits(path, backend, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=AutoRoundConfig(backend=backend))
    kernels = {m.kernel_name for m in model.modules() if hasattr(m, "kernel_name")}
    ids = torch.randint(100, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits, kernels


def test_cpu_kernels_agree_on_ragged_groups(w4g128):
    ref, kernels = _logits(w4g128, "torch")
    assert kernels == {"torch"}
    candidates = []
    if native_cpu.unavailable_reason() is None:
        candidates.append("avx2")
    try:
        import auto_round_kernel  # noqa: F401

        candidates.append("ark")
    except ImportError:
        pass
    if not candidates:
        pytest.skip("neither the avx2 kernel nor auto-round-lib is available")
    for backend in candidates:
        got, kernels = _logits(w4g128, backend)
        assert kernels == {backend}
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-3, f"{backend}: relative logit error {err:.2e}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
