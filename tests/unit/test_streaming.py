"""Streamed tuning (low_cpu_mem_usage, the default for a local model folder): blocks are read from the source
files when the loop reaches them and dropped after, their layers packed at once; the checkpoint equals the
in-memory route's, byte for byte, and what cannot stream says why and loads the model."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from autoround import AutoRound
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.streaming import StreamedModel, Stager

from arhelpers import tiny_llama

CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
RUN = dict(dataset=CALIB, nsamples=8, seqlen=32, batch_size=4, amp=False)


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[f"{f.parent.relative_to(folder)}/{k}"] = h.get_tensor(k)
    return out


def side_files(folder):
    return {str(f.relative_to(folder)): json.loads(f.read_text()) for f in sorted(Path(folder).rglob("*.json"))
            if f.name != "model.safetensors.index.json"}


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].reshape(-1).view(torch.uint8), tb[name].reshape(-1).view(torch.uint8)), name
    assert side_files(a) == side_files(b)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(layers=3).save_pretrained(path)
    return str(path)


def both(folder, tmp_path, fmt, caplog, **kw):
    """Run streamed and in memory; return (streamed out, in-memory out, streamed AutoRound, streamed model)."""
    outs = []
    with caplog.at_level(logging.INFO, logger="autoround"):
        for low in (True, False):
            ar = AutoRound(folder, low_cpu_mem_usage=low, **{**RUN, **kw})
            model, _ = ar.quantize_and_save(str(tmp_path / f"low{low}"), format=fmt)
            outs.append((ar, model))
    assert "streamed route (low_cpu_mem_usage)" in caplog.text
    assert "in-memory route" in caplog.text and "low_cpu_mem_usage=False" in caplog.text
    (ar, model), _ = outs
    return tmp_path / "lowTrue", tmp_path / "lowFalse", ar, model


def test_streamed_signround_writes_the_in_memory_checkpoint(folder, tmp_path, caplog):
    a, b, ar, model = both(folder, tmp_path, "auto_round,fake", caplog, iters=2, scheme="W2A16G32")
    assert model is None  # the streamed route keeps no model, as the model-free one
    assert_same_checkpoint(a, b)
    assert not list(tmp_path.glob(".*staging*"))  # the scratch folder of the packed layers is gone


def test_streamed_optimized_rtn_with_static_activations(folder, tmp_path, caplog):
    # optimized RTN's importance and FP8_STATIC's input scales come from each block's float forward
    a, b, _, _ = both(folder, tmp_path, "llm_compressor", caplog, iters=0, scheme="FP8_STATIC")
    assert_same_checkpoint(a, b)
    assert any(k.endswith("input_scale") for k in tensors(a))


def test_streamed_plain_rtn_where_the_model_free_route_cannot_write(folder, tmp_path, caplog):
    # the fake format is written from the loaded model, so the model-free route declines it; streaming does not
    a, b, _, _ = both(folder, tmp_path, "fake", caplog, iters=0, disable_opt_rtn=True)
    assert_same_checkpoint(a, b)


def test_one_block_in_memory_at_a_time(folder, tmp_path, monkeypatch):
    seen = []
    opened = StreamedModel.open_block

    def spy(self, name, block):
        blocks = self.model.model.layers
        seen.append(sum(not next(b.parameters()).is_meta for b in blocks))
        opened(self, name, block)

    monkeypatch.setattr(StreamedModel, "open_block", spy)
    AutoRound(folder, iters=1, **RUN).quantize_and_save(str(tmp_path / "out"))
    assert seen == [0, 0, 0]  # every earlier block was dropped before the next one was read
    # AutoScheme too: its importance pass, then per option a forward and a backward over the 3 blocks
    from autoround import AutoScheme

    seen.clear()
    auto = AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", nsamples=8, seqlen=32, batch_size=4)
    AutoRound(folder, iters=0, scheme=auto, **RUN).quantize_and_save(str(tmp_path / "auto"))
    assert seen == [0] * (3 + 2 * 2 * 3 + 3)  # importance, 2 options x (forward + backward), then quantizing


def test_a_failure_leaves_no_checkpoint_and_no_scratch(folder, tmp_path, monkeypatch):
    calls = []
    stage = Stager.stage

    def fail_second(self, layers):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        stage(self, layers)

    monkeypatch.setattr(Stager, "stage", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        AutoRound(folder, iters=0, **RUN).quantize_and_save(str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_after_a_streamed_run(folder, tmp_path):
    ar = AutoRound(folder, iters=1, **RUN)
    ar.quantize_and_save(str(tmp_path / "out"))
    with pytest.raises(AutoRoundError, match="tuned streamed.*pass them all to quantize_and_save"):
        ar.save_quantized(str(tmp_path / "other"), format="fake")
    with pytest.raises(AutoRoundError, match="never whole in memory; load the checkpoint written to"):
        ar.model
    model, _ = ar.quantize()  # a new run in memory: the float model is loaded and quantized
    assert not any(p.is_meta for p in model.parameters())
    ar.save_quantized(str(tmp_path / "other"), format="fake")


@pytest.mark.parametrize("kw, why", [
    (dict(low_cpu_mem_usage=False), "low_cpu_mem_usage=False"),
    (dict(rotation_config="default", scheme="MXFP4"), "transforms rewrite the whole loaded model"),
])
def test_what_cannot_stream_says_why(folder, tmp_path, caplog, kw, why):
    fmt = kw.pop("format", None)
    with caplog.at_level(logging.INFO, logger="autoround"):
        AutoRound(folder, iters=1, **{**RUN, **kw}).quantize_and_save(str(tmp_path / "out"), format=fmt)
    assert "in-memory route" in caplog.text and why in caplog.text
    assert "streamed route" not in caplog.text


def test_a_folder_streaming_cannot_reproduce_is_loaded(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)).save_pretrained(path)
    with caplog.at_level(logging.INFO, logger="autoround"):
        AutoRound(str(path), iters=1, **RUN).quantize_and_save(str(tmp_path / "out"))
    assert "streamed tuning does not read GPT-2 Conv1D weights" in caplog.text


def test_cli_switch():
    from autoround.quantizer.cli import build_parser

    args = build_parser().parse_args(["--model", "m", "--disable_low_cpu_mem_usage"])
    assert args.low_cpu_mem_usage is False
    assert build_parser().parse_args(["--model", "m"]).low_cpu_mem_usage is not False


@pytest.mark.parametrize("iters", [2, 0])
def test_activations_offloaded_to_files_give_the_same_checkpoint(folder, tmp_path, monkeypatch, caplog, iters):
    from autoround.quantizer import activations

    ar = AutoRound(folder, iters=iters, **RUN)
    ar.quantize_and_save(str(tmp_path / "memory"), format="auto_round")
    work = tmp_path / "ws"
    monkeypatch.setenv("AR_WORK_SPACE", str(work))
    monkeypatch.setattr(activations, "OFFLOAD_SHARE", 0.0)  # any size is "too large" for memory now
    with caplog.at_level(logging.INFO, logger="autoround"):
        AutoRound(folder, iters=iters, **RUN).quantize_and_save(str(tmp_path / "disk"), format="auto_round")
    assert "are kept in files under" in caplog.text
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "disk")
    assert list(work.iterdir()) == []  # the run's scratch folder is gone
    caplog.clear()
    monkeypatch.setenv("AR_DISABLE_OFFLOAD", "1")
    with caplog.at_level(logging.INFO, logger="autoround"):
        AutoRound(folder, iters=iters, **RUN).quantize_and_save(str(tmp_path / "kept"), format="auto_round")
    assert "AR_DISABLE_OFFLOAD keeps them in memory" in caplog.text and "kept in files" not in caplog.text
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "kept")


def test_an_offloaded_activation_tensor_lives_in_an_unlinked_file(tmp_path, monkeypatch):
    from autoround.memory import _file_backed
    from autoround.quantizer.activations import ActivationStore

    monkeypatch.setenv("AR_WORK_SPACE", str(tmp_path))
    store = ActivationStore(offload=True)
    t = store.empty((3, 1024, 64), torch.float32, torch.device("cpu"))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape))
    filled = store.filled(iter([t[:2], t[2:]]), 3)
    assert torch.equal(filled, t)
    start = t.data_ptr()
    assert _file_backed(start, start + t.numel() * 4)  # a file mapping, not the heap
    assert [list(p.iterdir()) for p in tmp_path.iterdir()] == [[]]  # mapped, then unlinked: nothing left on disk
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_streamed_auto_gptq_writes_the_in_memory_checkpoint(folder, tmp_path, caplog):
    a, b, _, _ = both(folder, tmp_path, "auto_gptq", caplog, iters=2, scheme="W4A16", group_size=32, sym=False)
    assert_same_checkpoint(a, b)


def test_auto_gptq_counts_wrapped_zero_points_of_staged_layers_as_of_held_ones(tmp_path):
    """GPTQ v1 stores zero point 0 as -1: the warning's count is the same whether a layer's weight is held or
    streamed tuning staged its packed tensors (then read back from the staging file)."""
    from autoround.quantizer.formats import ExportJob, QuantizedLayer
    from autoround.quantizer.formats.auto_gptq import staged_wrapped_zero_points, wrapped_zero_points
    from autoround.quantizer.formats.packing import gptq_layer_tensors
    from autoround.quantizer.formats.writer import FileSlice
    from autoround.quantizer.qmath import QuantizedWeight
    from autoround.quantizer.schemes import QuantScheme

    for bits in (2, 3, 4, 8):
        scheme = QuantScheme(bits=bits, group_size=32, sym=False)
        zero = torch.randint(0, 2**bits, (64, 4), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
        zero[0, :3] = 0
        qw = QuantizedWeight(torch.zeros(64, 128, dtype=torch.uint8), torch.ones(64, 4), zero, bits, 32, False)
        held = QuantizedLayer("l", scheme, qw, None, 128, 64)
        expected = int((zero == 0).sum())
        assert expected >= 3 and wrapped_zero_points(held, qw) == expected
        path = tmp_path / f"staged-{bits}.bin"
        entry = {}
        with open(path, "wb") as f:
            for suffix, t in gptq_layer_tensors(qw, zero_offset=1).items():
                offset = f.tell()
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                entry[suffix] = FileSlice(path, offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
        staged = QuantizedLayer("l", scheme, None, None, 128, 64)
        job = ExportJob(None, {"l": staged}, scheme, [], staged={"l": entry})
        assert staged_wrapped_zero_points(job) == expected, bits


@pytest.mark.parametrize("fmt", ["mlx", "auto_round:mlx"])
def test_streamed_mlx_writes_the_in_memory_checkpoint(folder, tmp_path, caplog, fmt):
    a, b, _, _ = both(folder, tmp_path, fmt, caplog, iters=2, scheme="W4A16", group_size=32, sym=False)
    assert_same_checkpoint(a, b)


@pytest.mark.parametrize("iters", [0, 2])
def test_streamed_autoscheme_scores_and_writes_as_in_memory(folder, tmp_path, caplog, iters):
    """AutoScheme streams: the option scores (and optimized RTN's importance for them) are computed with each
    block read in for its turn, the choices and the checkpoint equal the in-memory run's."""
    from autoround import AutoScheme

    auto = AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", nsamples=8, seqlen=32, batch_size=4)
    a, b, ar, _ = both(folder, tmp_path, "auto_round", caplog, iters=iters, scheme=auto)
    assert_same_checkpoint(a, b)
    assert "AutoScheme: target 3.0000 bits" in caplog.text
    assert {s.bits for s in ar.pipeline.auto_result.schemes.values()} == {2, 4}  # a real mix was chosen


# --- streamed tuning on an accelerator: the model stays in host memory, each block visits the device -------------


@pytest.mark.parametrize("kw", [dict(iters=2), dict(iters=0),
                                dict(iters=0, scheme=None)], ids=["signround", "opt-rtn", "autoscheme"])
def test_host_placement_takes_the_device_path_and_writes_the_same_checkpoint(folder, tmp_path, monkeypatch, kw):
    """A placement in host mode whose device is the CPU takes every step of the accelerator path (the modules
    outside the blocks sent to the device and back, each block sent there whole for its turn and back, the
    tuned tensors brought home) with numbers one can compare: the checkpoint is the plain streamed one's."""
    import autoround.quantizer.devices as devices
    from autoround import AutoScheme
    from autoround.quantizer.devices import Placement

    if kw.get("scheme", "x") is None:
        kw = dict(kw, scheme=AutoScheme(avg_bits=3.0, options="W2A16G32,W4A16", nsamples=8, seqlen=32, batch_size=4))
    moved: list[str] = []
    real = devices.place_outside_blocks
    monkeypatch.setattr(devices, "place_outside_blocks", lambda m, b, d: (moved.append(str(d)), real(m, b, d)))
    outs = []
    for host in (False, True):
        ar = AutoRound(folder, **{**RUN, "iters": 2, **kw})
        if host:
            ar.pipeline.placement = Placement(torch.device("cpu"), (torch.device("cpu"),), host=True)
        ar.quantize_and_save(str(tmp_path / f"host{host}"), format="auto_round")
        outs.append(tmp_path / f"host{host}")
        assert bool(moved) is host  # only the host placement sends the modules outside the blocks over
    assert_same_checkpoint(*outs)


def test_streaming_on_an_accelerator_keeps_the_model_in_host_memory(folder, monkeypatch):
    """device_map naming one accelerator no longer turns streaming off: the folder is opened streamed and the
    placement keeps the model in host memory (checked with a CUDA device the resolver is told exists; nothing
    runs on it)."""
    import autoround.quantizer.devices as devices

    real = devices._count
    monkeypatch.setattr(devices, "_count", lambda kind: 2 if kind == "cuda" else real(kind))
    ar = AutoRound(folder, device_map="cuda:0", **RUN)
    pipe = ar.pipeline
    assert pipe.stream_reason([]) is None
    assert pipe.load_streamed()
    assert pipe.placement.host and pipe.placement.in_host and pipe.placement.device == torch.device("cuda", 0)
    assert all(p.device.type in ("cpu", "meta") for p in pipe.model.parameters())
    two = AutoRound(folder, device_map="0,1", **RUN).pipeline  # several devices stream as well
    assert two.stream_reason([]) is None


@pytest.mark.parametrize("kw", [dict(iters=2), dict(iters=0)], ids=["signround", "opt-rtn"])
def test_several_devices_stream_too(folder, tmp_path, monkeypatch, caplog, kw):
    """Several devices (here two that are both the CPU, so the numbers compare): each streamed block is read in,
    its layers spread over the devices behind accelerate's hooks, and dropped; the checkpoint is the plain
    streamed one's."""
    from accelerate.hooks import AlignDevicesHook

    from autoround.quantizer.devices import Placement

    ran: list[str] = []
    real = AlignDevicesHook.pre_forward
    monkeypatch.setattr(AlignDevicesHook, "pre_forward",
                        lambda self, module, *a, **k: (ran.append(type(module).__name__), real(self, module, *a, **k))[1])
    cpu = torch.device("cpu")
    outs = []
    for several in (False, True):
        ar = AutoRound(folder, **{**RUN, **kw})
        if several:
            ar.pipeline.placement = Placement(cpu, (cpu, cpu), spread=True)
        with caplog.at_level(logging.INFO, logger="autoround"):
            caplog.clear()
            ar.quantize_and_save(str(tmp_path / f"several{several}"), format="auto_round")
        assert "streamed route (low_cpu_mem_usage)" in caplog.text
        outs.append(tmp_path / f"several{several}")
    assert "Linear" in ran  # the layers ran behind their placement hooks
    assert_same_checkpoint(*outs)


@pytest.mark.parametrize("iters", [2, 0])
def test_streamed_gguf_writes_the_in_memory_file(folder, tmp_path, caplog, iters):
    """GGUF streams: its file is written one tensor at a time, the block layers from their stage files and the
    rest read from the source; the file is the in-memory run's byte for byte."""
    a, b, _, _ = both(folder, tmp_path, "gguf:q4_0", caplog, iters=iters, scheme="GGUF:Q4_0")
    fa, fb = sorted(Path(a).glob("*.gguf")), sorted(Path(b).glob("*.gguf"))
    assert len(fa) == len(fb) == 1 and fa[0].name == fb[0].name
    assert fa[0].read_bytes() == fb[0].read_bytes()
