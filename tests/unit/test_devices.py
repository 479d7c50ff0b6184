"""device_map resolution: what the reference accepts, mapped to what this machine has."""

import pytest
import torch

from autoround.quantizer.devices import available, resolve_device_map
from autoround.quantizer.errors import AutoRoundError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA devices")


@pytest.mark.parametrize("value", [None, "", "cpu", "CPU", {}, {"": "cpu"}, {"model.layers.0": "cpu", "lm_head": "cpu"},
                                   ["cpu"], torch.device("cpu")])
def test_cpu_spellings(value):
    assert resolve_device_map(value) == torch.device("cpu")


@NO_CUDA
def test_auto_is_the_cpu_without_accelerators():
    assert resolve_device_map("auto") == torch.device("cpu") and available().startswith("cpu")


@NO_CUDA
@pytest.mark.parametrize("value,named", [(0, "cuda:0"), ("1", "cuda:1"), ("0,1,2,3", "cuda:0"), ("cuda:0", "cuda:0"),
                                         ({"model.layers.0": 0}, "cuda:0")])
def test_missing_devices_are_one_clear_error(value, named):
    with pytest.raises(AutoRoundError, match=rf"names {named}, which this machine does not have \(it has: cpu"):
        resolve_device_map(value)


@pytest.mark.parametrize("value", ["gpu0", "cuda:x", True])
def test_not_a_device(value):
    with pytest.raises(AutoRoundError, match="not a device"):
        resolve_device_map(value)


def test_several_devices_are_refused_as_not_built():
    with pytest.raises(AutoRoundError, match="spreads the run over cpu, meta: .*several devices is not built yet"):
        resolve_device_map({"model.layers.0": "cpu", "model.layers.1": "meta"})
    with pytest.raises(AutoRoundError, match="meta device holds no weights"):
        resolve_device_map("meta")


def test_autoround_checks_the_device_before_loading(tmp_path):
    from autoround import AutoRound

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(AutoRoundError, match="device_map='0,1'"):
        AutoRound(str(tmp_path / "no-such-model"), device_map="0,1")
