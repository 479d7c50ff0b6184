"""The pipeline owns the stage order; AutoRound is a facade over it; the transform stage runs between load and
plan, once, and a transform keeps the run off the model-free route."""

import pytest
import torch

from autoround import AutoRound
from autoround.quantizer.pipeline import STAGES, Pipeline
from autoround.quantizer.transforms import Transform

from arhelpers import tiny_llama

LAYER = "model.layers.0.mlp.up_proj"


class ZeroLayer(Transform):
    """Zeroes one layer's weight; records the pipeline state it saw."""

    name = "zero-layer"

    def __init__(self, pipeline=None):
        self.pipeline, self.seen = pipeline, []

    def apply(self, model, linears, block_names):
        self.seen.append(self.pipeline.plan if self.pipeline is not None else None)
        with torch.no_grad():
            linears[LAYER].weight.zero_()
        return linears


def test_stage_order_is_the_documented_one():
    assert STAGES == ("load", "transform", "plan", "calibrate", "quantize", "export", "evaluate")
    for stage in ("load", "transform", "calibrate", "quantize", "export", "evaluate"):
        assert callable(getattr(Pipeline, stage)), stage


def test_facade_reads_and_writes_the_pipeline_state():
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True, group_size=32)
    assert isinstance(ar.pipeline, Pipeline) and ar.model is ar.pipeline.model
    ar.resume_dir = "somewhere"
    assert ar.pipeline.resume_dir == "somewhere" and "resume_dir" not in ar.__dict__
    with pytest.raises(AttributeError, match="read-only"):
        ar.tuning_options = None
    with pytest.raises(AttributeError, match="'AutoRound' object has no attribute 'nonexistent'"):
        ar.nonexistent


def test_transform_runs_after_load_before_plan_and_once():
    ar = AutoRound(tiny_llama(), iters=0, disable_opt_rtn=True, group_size=32)
    t = ZeroLayer(ar.pipeline)
    ar.pipeline.transforms.append(t)
    ar.quantize()
    assert t.seen == [None]  # no plan yet when it ran
    assert torch.count_nonzero(ar.layers[LAYER].weight.dequantize()) == 0  # the plan quantized the rewrite
    other = "model.layers.0.mlp.down_proj"
    assert torch.count_nonzero(ar.layers[other].weight.dequantize()) > 0
    ar.quantize()
    assert len(t.seen) == 1


def test_a_transform_keeps_the_run_off_the_model_free_route(tmp_path):
    folder = tmp_path / "src"
    tiny_llama().save_pretrained(folder)
    ar = AutoRound(str(folder), iters=0, disable_opt_rtn=True, group_size=32)
    assert not ar.pipeline.loaded
    ar.pipeline.transforms.append(ZeroLayer())
    ar.quantize_and_save(str(tmp_path / "out"))
    assert ar.pipeline.loaded
    assert torch.count_nonzero(ar.layers[LAYER].weight.dequantize()) == 0
