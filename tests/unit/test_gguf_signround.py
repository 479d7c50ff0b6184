"""SignRound (iters > 0) on llama.cpp block types: the tuned block beats the iters-0 quantizer, the tuned
integers/scales are encoded exactly (the ``gguf`` package decodes them to the tuned fake-quantized weights), and
the files load in transformers."""

import copy
import glob
import logging
import os

import numpy as np
import pytest
import torch

import gguf
from arhelpers import tiny_llama
from autoround import AutoRound
from autoround.quantizer.dtypes import gguf as gq
from autoround.quantizer.dtypes.gguf import tune as gguf_tune
from autoround.quantizer.dtypes.gguf.types import plan_types
from autoround.quantizer.formats.gguf import permute_qk
from autoround.quantizer.resume import ResumeStore
from autoround.quantizer.dtypes.gguf.family import gguf_scheme
from autoround.quantizer.importance import block_importance as input_importance
from autoround.quantizer.signround import SignRoundOptions, tune_block

TYPES = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k"]


def _gtype(name):
    return gguf.GGMLQuantizationType(gq.GGML_TYPES[name].ggml_id)


def _gguf_dequant(w: gq.GGUFWeight) -> np.ndarray:
    return gguf.quants.dequantize(w.data.numpy(), _gtype(w.qtype)).reshape(w.shape)


# --- the pure math: exact encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", gguf_tune.TUNABLE_TYPES)
def test_encoded_blocks_decode_to_the_tuned_weights_bit_for_bit(qtype):
    """Random tuned parameters (v, scale and offset factors): the gguf package decodes the encoded blocks to
    exactly the fake-quantized weight the forward pass sees."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 512, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    init = gguf_tune.initial_params(w, qtype)
    v = torch.rand(w.shape, generator=g) - 0.5
    alpha = gguf_tune.FACTOR_MIN + torch.rand((*init.scale.shape, 1), generator=g)
    beta = gguf_tune.FACTOR_MIN + torch.rand((*init.scale.shape, 1), generator=g)
    value = gguf_tune.fake_quantize(w, init, v, alpha, beta)
    qw = gguf_tune.encode(w, init, v, alpha, beta)
    assert qw.qtype == qtype and qw.data.dtype == torch.uint8
    assert np.array_equal(_gguf_dequant(qw), value.numpy())
    assert torch.equal(qw.dequantize(), value)
    assert not torch.equal(value, gguf_tune.fake_quantize(w, init))  # the parameters did change the weights


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q2_k", "q3_k"])
@pytest.mark.parametrize("with_importance", [False, True])
def test_k_quant_start_is_exactly_the_iters0_result(qtype, with_importance):
    """v = 0, factors 1: the double-quantized sub-block scales and the weight integers are the iters-0 ones."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 512, generator=g)
    imp = torch.rand(512, generator=g) if with_importance else None
    init = gguf_tune.initial_params(w, qtype, imp)
    start = gguf_tune.encode(w, init)
    assert torch.equal(start.data, gq.quantize_tensor(w, qtype, imp))


def test_gradients_reach_every_parameter():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    init = gguf_tune.initial_params(w, "q4_k")
    v = torch.zeros(w.shape, requires_grad=True)
    alpha = torch.ones((*init.scale.shape, 1), requires_grad=True)
    beta = torch.ones((*init.scale.shape, 1), requires_grad=True)
    (gguf_tune.fake_quantize(w, init, v, alpha, beta) - w * 1.01).pow(2).sum().backward()
    for p in (v, alpha, beta):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_untunable_types_are_a_clear_error():
    w = torch.randn(2, 64)
    with pytest.raises(ValueError, match="SignRound cannot tune ggml type 'iq4_nl'; tunable types: q4_0"):
        gguf_tune.initial_params(w, "iq4_nl")
    with pytest.raises(ValueError, match="not a multiple of the q4_k block size 256"):
        gguf_tune.initial_params(w, "q4_k")


# --- tuning a block ----------------------------------------------------------------------------------------


def _mlp_case(n_layers=1, i_layer=0):
    model = tiny_llama(hidden=256, inter=256, layers=n_layers)
    mlp = model.model.layers[i_layer].mlp
    x = torch.randn(16, 16, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = mlp(x)
    return model, mlp, x, y, ["gate_proj", "up_proj", "down_proj"]


def _fwd(block, h):
    return block(h)


def _mse(block, weights, x, y):
    b = copy.deepcopy(block)
    with torch.no_grad():
        for n, qw in weights.items():
            b.get_submodule(n).weight.copy_(qw.dequantize())
        return torch.nn.functional.mse_loss(b(x), y).item()


@pytest.mark.parametrize("qtype", TYPES + ["q4_k_m"])
def test_tuned_block_beats_the_iters0_quantizer(qtype):
    """(a) a few SignRound iterations on a Llama MLP give a lower block-output MSE than the iters-0
    (importance-weighted llama.cpp) quantizer on the same inputs; the block itself is left unchanged."""
    if qtype == "q4_k_m":  # the mixture llama.cpp gives layer 1 of 2: q6_k ffn_down, q4_k ffn_gate/ffn_up
        model, mlp, x, y, names = _mlp_case(n_layers=2, i_layer=1)
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
        plan = plan_types(shapes, "q4_k_m")
        types = {n: plan[f"model.layers.1.mlp.{n}"] for n in names}
        assert types == {"gate_proj": "q4_k", "up_proj": "q4_k", "down_proj": "q6_k"}
    else:
        model, mlp, x, y, names = _mlp_case()
        types = dict.fromkeys(names, qtype)
    schemes = {n: gguf_scheme(t) for n, t in types.items()}
    before = {n: mlp.get_submodule(n).weight.clone() for n in names}
    imp = input_importance(mlp, names, x, _fwd, 16)
    iters0 = {
        n: gq.GGUFWeight(gq.quantize_tensor(mlp.get_submodule(n).weight, t, imp[n]), t, (256, 256))
        for n, t in types.items()
    }
    # one batch of all 16 samples: the best-loss choice is made on the inputs the test measures on
    result = tune_block(mlp, schemes, x, y, SignRoundOptions(iters=20, batch_size=16), forward=_fwd)
    assert {n: w.qtype for n, w in result.weights.items()} == types
    tuned, base = _mse(mlp, result.weights, x, y), _mse(mlp, iters0, x, y)
    print(f"{qtype}: block MSE iters-0 {base:.4g} -> SignRound {tuned:.4g}")
    assert tuned < base
    for n in names:
        assert torch.equal(mlp.get_submodule(n).weight, before[n])
        assert type(mlp.get_submodule(n)) is torch.nn.Linear


def test_untunable_type_falls_back_to_iters0_with_an_info_log(caplog):
    _, mlp, x, y, names = _mlp_case()
    schemes = {n: gguf_scheme("q4_0") for n in names}
    schemes["down_proj"] = gguf_scheme("iq4_nl")
    imp = input_importance(mlp, names, x, _fwd, 8)
    logger = logging.getLogger("autoround")  # the project logger does not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="autoround"):
            result = tune_block(mlp, schemes, x, y, SignRoundOptions(iters=2, batch_size=8), forward=_fwd)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("does not tune iq4_nl" in r.message and "down_proj" in r.message for r in caplog.records)
    down = result.weights["down_proj"]
    assert down.qtype == "iq4_nl"
    assert torch.equal(down.data, gq.quantize_tensor(mlp.down_proj.weight, "iq4_nl", imp["down_proj"]))
    assert result.weights["up_proj"].qtype == "q4_0"


def test_resume_store_keeps_gguf_blocks(tmp_path):
    w = gq.GGUFWeight(gq.quantize_tensor(torch.randn(4, 256), "q4_k"), "q4_k", (4, 256))
    store = ResumeStore.open(tmp_path / "state", {"x": 1}, False, logging.getLogger("autoround"))
    store.save_block("model.layers.0", {"mlp.up_proj": w}, (1.0, 0.5))
    weights, losses, ratios = store.load_block("model.layers.0")
    back = weights["mlp.up_proj"]
    assert ratios == {}
    assert back.qtype == "q4_k" and back.shape == (4, 256) and torch.equal(back.data, w.data)
    assert losses == (1.0, 0.5)


# --- end to end: AutoRound(iters > 0) -> .gguf -> gguf package / transformers -------------------------------

_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj"}


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (32,), generator=g) for _ in range(4)]


@pytest.mark.parametrize("ftype,expect", [
    ("q4_0", {"q4_0"}), ("q4_1", {"q4_1"}), ("q8_0", {"q8_0"}), ("q4_k_s", {"q4_k", "q5_k"}), ("q6_k", {"q6_k"}),
    ("q4_k_m", {"q4_k", "q6_k"}),
])
def test_signround_gguf_file_decodes_to_the_tuned_model_and_loads_in_transformers(tmp_path, ftype, expect):
    """(b) the gguf package decodes every block tensor of the written file to exactly the tuned weights the
    quantized model holds; (c) transformers loads the file (gguf_file=) to the same weights."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=256, inter=512, layers=2, vocab=256)
    float_w = {k: v.clone() for k, v in model.state_dict().items()}
    ar = AutoRound(model, scheme=f"GGUF:{ftype.upper()}", iters=3, dataset=_calib(), nsamples=4, seqlen=32,
                   batch_size=2)
    _, (out,) = ar.quantize_and_save(str(tmp_path / ftype), format=f"gguf:{ftype}")
    (path,) = glob.glob(os.path.join(out, "*.gguf"))
    reader = gguf.GGUFReader(path)
    ours = ar.model.state_dict()
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    seen = set()
    for t in reader.tensors:
        if not t.name.startswith("blk.") or t.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        i, kind = t.name.split(".")[1:3]
        name = f"model.layers.{i}.{_HF[kind]}.weight"
        w = ours[name]
        assert ar.layers[name[: -len(".weight")]].weight.qtype == t.tensor_type.name.lower()
        seen.add(t.tensor_type.name.lower())
        if kind in ("attn_q", "attn_k"):
            w = permute_qk(w, n_head if kind == "attn_q" else n_kv)
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        assert np.array_equal(deq, w.numpy()), t.name
        assert not torch.equal(ours[name], float_w[name])
    assert seen == expect
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=os.path.basename(path), dtype=torch.float32)
    got = loaded.state_dict()
    for name, w in ours.items():
        if "embed_tokens" in name or "lm_head" in name:
            continue  # quantized by the writer with the iters-0 route, float in our model
        assert torch.equal(got[name], w), name
