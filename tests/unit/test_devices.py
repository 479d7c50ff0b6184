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


def test_meta_is_refused():
    with pytest.raises(AutoRoundError, match="meta device holds no weights"):
        resolve_device_map("meta")
    with pytest.raises(AutoRoundError, match="meta device holds no weights"):
        resolve_device_map({"model.layers.0": "cpu", "model.layers.1": "meta"})


def test_autoround_checks_the_device_before_loading(tmp_path):
    from autoround import AutoRound

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(AutoRoundError, match="device_map='0,1'"):
        AutoRound(str(tmp_path / "no-such-model"), device_map="0,1")


# -- several devices ------------------------------------------------------------------------------------------------
# The placement logic with devices this machine does not have: ``_count`` is told there are two CUDA devices (for
# resolving names only; nothing here runs on them).  The block loop's side of it runs for real below, with a
# placement whose devices are all the CPU, which takes every step of the several-device path (hooks on every
# layer and on SignRound's wrappers, blocks moved to the main device and back, tensors brought home).

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.fixture
def two_gpus(monkeypatch):
    import autoround.quantizer.devices as devices

    real = devices._count
    monkeypatch.setattr(devices, "_count", lambda kind: 2 if kind == "cuda" else real(kind))


def test_several_devices_resolve_to_a_placement(two_gpus):
    from autoround.quantizer.devices import resolve_placement

    p = resolve_placement("0,1")
    assert (p.device, p.devices, p.spread, p.rules) == (CUDA0, (CUDA0, CUDA1), True, ())
    assert resolve_placement("auto").devices == (CUDA0, CUDA1) and resolve_placement([1, 0]).device == CUDA1
    p = resolve_placement({"mlp": 1, "self_attn": "cuda:0"})  # the main device: the lowest-numbered accelerator
    assert (p.device, p.devices, p.spread) == (CUDA0, (CUDA0, CUDA1), False)
    assert p.rules == (("mlp", CUDA1), ("self_attn", CUDA0))
    p = resolve_placement({"mlp.experts": "cpu", ".*": 0})  # experts in host memory, the rest on the GPU
    assert (p.device, p.devices) == (CUDA0, (CUDA0, CPU))
    single = resolve_placement({"mlp": 1, "self_attn": "cuda:1"})
    assert (single.device, single.several) == (CUDA1, False)
    with pytest.raises(AutoRoundError, match=r"key '\(mlp' is not a regular expression"):
        resolve_placement({"(mlp": 0, "self_attn": 1})
    with pytest.raises(AutoRoundError, match="names cuda:2, which this machine does not have"):
        resolve_placement("0,1,2")


def test_spread_splits_a_block_in_order_by_weight_bytes():
    from autoround.quantizer.devices import Placement

    from arhelpers import tiny_llama

    block = tiny_llama(hidden=64, inter=160, layers=1).model.layers[0]
    layers = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    for devices in [(CUDA0, CUDA1), (CUDA0, CUDA1, torch.device("cuda", 2))]:
        where = Placement(CUDA0, devices, spread=True).assign("model.layers.0", block, layers)
        assert list(where) == layers
        order = [devices.index(d) for d in where.values()]
        assert order == sorted(order) and set(order) == set(range(len(devices)))  # contiguous runs, every device
        size = {n: block.get_submodule(n).weight.numel() for n in layers}
        share = {d: sum(size[n] for n in layers if where[n] == d) for d in devices}
        # each device's share is within one layer of an equal split
        assert max(share.values()) - min(share.values()) <= max(size.values()), share


def test_dict_rules_match_names_relative_full_and_as_expressions():
    from autoround.quantizer.devices import Placement

    rules = (("model.layers.1.self_attn.k_proj", CPU), ("mlp", CUDA1), (r".*_proj", CUDA0))
    p = Placement(CUDA0, (CUDA0, CUDA1, CPU), rules)
    block = torch.nn.Module()
    names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"]
    for n in names:
        parent, _, child = n.rpartition(".")
        if not hasattr(block, parent):
            block.add_module(parent, torch.nn.Module())
        getattr(block, parent).add_module(child, torch.nn.Linear(2, 2))
    assert p.assign("model.layers.1", block, names) == {
        "self_attn.q_proj": CUDA0, "self_attn.k_proj": CPU, "mlp.up_proj": CUDA1, "mlp.down_proj": CUDA1}
    # a full name is that block's alone ("model.layers.1" is not a prefix of "model.layers.10"); first rule wins
    assert p.assign("model.layers.10", block, names)["self_attn.k_proj"] == CUDA0
    unmatched = Placement(CUDA0, (CUDA0, CUDA1), (("mlp", CUDA1), ("lm_head", CUDA0), ("model.layers.1", CUDA1)))
    assert unmatched.unmatched(["model.layers.10.mlp.up_proj"], ["model.layers"]) == ["lm_head", "model.layers.1"]


def test_to_device_moves_every_tensor_of_a_quantized_layer():
    from autoround.quantizer.devices import to_device
    from autoround.quantizer.formats import QuantizedLayer
    from autoround.quantizer.qmath import quantize_weight
    from autoround.quantizer.schemes import resolve_scheme

    w = torch.randn(8, 64)
    layer = QuantizedLayer("x", resolve_scheme("W4A16"), quantize_weight(w, 4, 32, True), torch.zeros(8), 64, 8)
    assert to_device(layer, CPU) is layer  # nothing to move: the same object
    meta = to_device(layer, torch.device("meta"))
    assert meta.weight.qweight.is_meta and meta.weight.scale.is_meta and meta.bias.is_meta
    assert (meta.scheme, meta.weight.bits, meta.in_features) == (layer.scheme, 4, 64)
    assert not layer.weight.qweight.is_meta  # the original is untouched


def test_place_outside_blocks_leaves_the_blocks_alone():
    from autoround.quantizer.devices import place_outside_blocks

    from arhelpers import tiny_llama

    model = tiny_llama(layers=2)
    place_outside_blocks(model, ["model.layers"], torch.device("meta"))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.is_meta == (not name.startswith("model.layers.")), name


CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
RUN = dict(dataset=CALIB, nsamples=8, seqlen=32, batch_size=4, amp=False, low_cpu_mem_usage=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from arhelpers import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(layers=2).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kw", [dict(iters=3), dict(iters=0), dict(iters=2, scheme="FP8_STATIC"),
                                dict(iters=2, scheme="NVFP4")], ids=["signround", "opt-rtn", "fp8-static", "nvfp4"])
@pytest.mark.parametrize("rules", [False, True], ids=["spread", "dict"])
def test_the_several_device_path_gives_the_one_device_result(tiny_folder, kw, rules, monkeypatch):
    from accelerate.hooks import AlignDevicesHook

    from autoround import AutoRound
    from autoround.quantizer.devices import Placement

    ran_on: list[str] = []
    real = AlignDevicesHook.pre_forward

    def spy(self, module, *args, **kwargs):
        ran_on.append(type(module).__name__)
        return real(self, module, *args, **kwargs)

    monkeypatch.setattr(AlignDevicesHook, "pre_forward", spy)
    states = []
    for several in (False, True):
        ar = AutoRound(tiny_folder, **{**RUN, **kw})
        if several:  # two "devices" that are both the CPU: the several-device path, with numbers one can compare
            ar.pipeline.placement = Placement(CPU, (CPU, CPU), (("mlp", CPU), ("self_attn", CPU)) if rules else (),
                                              spread=not rules)
        model, _ = ar.quantize()
        assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # every hook removed
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        if not several:
            assert ran_on == []
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "the several-device path changed weights"
    assert "Linear" in ran_on  # the layers ran behind their placement hooks
    if kw["iters"]:  # and so did SignRound's tuning wrappers that replace them
        assert any(name.startswith("Tuned") for name in ran_on), set(ran_on)


def test_several_devices_refuse_what_runs_on_one(two_gpus, tiny_folder):
    from autoround import AutoRound, AutoScheme

    with pytest.raises(AutoRoundError, match="AutoScheme.*scores the options on one device"):
        AutoRound(tiny_folder, scheme=AutoScheme(avg_bits=3, options=("W2A16", "W4A16")), device_map="0,1")
    with pytest.raises(AutoRoundError, match="rotation_config rotates the model on one device"):
        AutoRound(tiny_folder, scheme="MXFP4", rotation_config="default", device_map="0,1")
    ar = AutoRound(tiny_folder, device_map={"mlp": 1, "attn_typo": 0}, **{**RUN, "iters": 2})
    with pytest.raises(AutoRoundError, match="device_map key.*'attn_typo' match no quantized layer inside the blocks"):
        ar.quantize()
    assert all(p.device.type == "cpu" for p in ar.pipeline.model.parameters())  # nothing went to a GPU
