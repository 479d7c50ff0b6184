"""The engine-independent part of the vLLM/SGLang adapters: config parsing, fused-layer checks, routing.

No engine is installed in the main virtualenv; these tests also prove the package imports without one.
"""

import sys

import pytest
import torch

from autoround.engine_common import (
    ROUTE_ENGINE,
    ROUTE_OURS,
    EnginePlanner,
    build_kernel,
    choose_kernel,
    claims,
    cuda_route,
    expected_shapes,
    parse_checkpoint_config,
    shard_layer_names,
)
from autoround.quantizer.errors import BackendError, ModelLoadError, SchemeError
from autoround.quantizer.schemes import FLOAT, QuantScheme

BASE = {
    "quant_method": "auto-round",
    "packing_format": "auto_round:auto_gptq",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "data_type": "int",
    "block_name_to_quantize": "model.layers",
}


def planner(extra=None, names=None, **changes):
    cfg = dict(BASE, **changes)
    if extra is not None:
        cfg["extra_config"] = extra
    return EnginePlanner(parse_checkpoint_config(cfg), names)


def test_engines_are_not_imported():
    import autoround  # noqa: F401
    import autoround.engine_common  # noqa: F401
    import autoround.packed_linear  # noqa: F401

    assert "vllm" not in sys.modules and "sglang" not in sys.modules


def test_shard_names_of_fused_layers():
    assert shard_layer_names("model.layers.3.self_attn.qkv_proj", None) == [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert shard_layer_names("model.layers.0.mlp.gate_up_proj", {"gate_up_proj": ["w1", "w3"]}) == [
        "model.layers.0.mlp.w1",
        "model.layers.0.mlp.w3",
    ]
    assert shard_layer_names("model.layers.0.mlp.down_proj", None) == ["model.layers.0.mlp.down_proj"]


def test_plan_uses_default_extra_config_and_blocks():
    p = planner(extra={"model.layers.1.mlp.down_proj": {"bits": 8}, r".*\.0\.self_attn\.o_proj": {"bits": 16}})
    assert p.plan("model.layers.0.self_attn.qkv_proj").scheme == QuantScheme(4, 128, True)
    assert p.plan("model.layers.1.mlp.down_proj").scheme.bits == 8
    assert p.plan("model.layers.0.self_attn.o_proj").scheme is FLOAT  # regex override to float
    assert not p.plan("lm_head").quantized  # outside block_name_to_quantize
    assert p.plan("model.layers.0.self_attn.qkv_proj").parts[0] == "model.layers.0.self_attn.q_proj"


def test_quantized_lm_head_from_extra_config():
    p = planner(extra={"lm_head": {"bits": 8, "group_size": 64}})
    plan = p.plan("lm_head")
    assert plan.quantized and plan.scheme.bits == 8 and plan.scheme.group_size == 64


def test_fused_layer_with_different_parts_fails_naming_them():
    p = planner(extra={"model.layers.2.self_attn.k_proj": {"bits": 8}})
    with pytest.raises(SchemeError) as err:
        p.plan("model.layers.2.self_attn.qkv_proj")
    msg = str(err.value)
    assert "model.layers.2.self_attn.qkv_proj" in msg
    assert "model.layers.2.self_attn.k_proj: W8A16" in msg
    assert "model.layers.2.self_attn.q_proj" in msg and "model.layers.2.self_attn.v_proj" in msg
    # another layer is fine
    assert p.plan("model.layers.3.self_attn.qkv_proj").scheme.bits == 4


def test_fused_gate_up_half_float_fails():
    p = planner(extra={"model.layers.0.mlp.up_proj": {"bits": 16}})
    with pytest.raises(SchemeError, match=r"gate_up_proj.*up_proj: float"):
        p.plan("model.layers.0.mlp.gate_up_proj")


def test_part_stored_as_float_weight_counts_as_float():
    names = {"model.layers.0.mlp.gate_proj.qweight", "model.layers.0.mlp.up_proj.weight"}
    p = planner(names=names)
    with pytest.raises(SchemeError, match="up_proj: float"):
        p.plan("model.layers.0.mlp.gate_up_proj")
    both_float = planner(names={"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"})
    assert not both_float.plan("model.layers.0.mlp.gate_up_proj").quantized


def test_moe_experts_must_agree():
    prefix = "model.layers.0.mlp.experts"
    p = planner()
    plan = p.plan_experts(prefix, 4)
    assert plan.quantized and len(plan.parts) == 12
    bad = planner(extra={f"{prefix}.2.down_proj": {"bits": 2}})
    with pytest.raises(SchemeError, match=r"fused MoE layer .*experts.*experts\.2\.down_proj: W2A16"):
        bad.plan_experts(prefix, 4)
    mixtral = planner(names={f"{prefix}.0.w1.qweight"})
    assert mixtral.expert_parts(prefix, 1) == [f"{prefix}.0.w1", f"{prefix}.0.w3", f"{prefix}.0.w2"]


def test_missing_tensors_listed():
    names = {"model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.scales"}
    p = planner(names=names)
    plan = p.plan("model.layers.0.self_attn.qkv_proj")
    missing = p.missing_tensors(plan)
    assert "model.layers.0.self_attn.q_proj.qzeros" in missing
    assert "model.layers.0.self_attn.k_proj.qweight" in missing
    assert "model.layers.0.self_attn.q_proj.qweight" not in missing


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_unsupported_bits_fail_at_parse(bits):
    with pytest.raises(SchemeError, match=f"{bits}-bit.*2, 3, 4, 8"):
        parse_checkpoint_config(dict(BASE, bits=bits))


def test_unsupported_bits_in_extra_config_fail_at_plan():
    p = planner(extra={"model.layers.0.mlp.down_proj": {"bits": 6}})
    with pytest.raises(SchemeError, match="layer model.layers.0.mlp.down_proj is 6-bit"):
        p.plan("model.layers.0.mlp.down_proj")


def test_bad_configs():
    with pytest.raises(SchemeError, match="act-order"):
        parse_checkpoint_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(SchemeError, match="'awq' cannot be served"):
        parse_checkpoint_config({"quant_method": "awq", "bits": 4})
    with pytest.raises(SchemeError, match="data_type 'mx_fp'"):
        parse_checkpoint_config(dict(BASE, data_type="mx_fp"))
    with pytest.raises(SchemeError, match="packing_format"):
        parse_checkpoint_config(dict(BASE, packing_format="auto_round:llm_compressor"))
    gptq = parse_checkpoint_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    assert gptq.zero_offset == 1


def test_claims():
    assert claims({"quant_method": "auto-round"}, None)
    assert not claims({"quant_method": "gptq"}, None)  # the engine's own gptq method keeps it
    assert claims({"quant_method": "gptq"}, "auto-round")  # unless the user asks for ours
    assert not claims({"quant_method": "auto-round"}, "gptq")
    assert not claims(None, "auto-round")


def test_cuda_route():
    w4 = QuantScheme(4, 128, True)
    assert cuda_route(w4, "auto_round:auto_gptq", 4096, 4096, 90)[0] == ROUTE_ENGINE
    assert cuda_route(QuantScheme(8, -1, True), "auto_round", 4096, 4096, 80)[0] == ROUTE_ENGINE
    route, why = cuda_route(w4, "auto_round:auto_gptq", 4096, 4096, 70)
    assert route == ROUTE_OURS and "compute capability 70" in why
    # SmolLM2: 576 inputs leave a ragged group of 128, and 192 outputs do not fit the tiles
    route, why = cuda_route(w4, "auto_round:auto_gptq", 576, 192, 90)
    assert route == ROUTE_OURS and "ragged" in why and "tiles" in why
    assert cuda_route(QuantScheme(3, 128, True), "auto_round:auto_gptq", 4096, 4096, 90)[0] == ROUTE_OURS
    route, why = cuda_route(QuantScheme(4, 128, False), "auto_round", 4096, 4096, 90)
    assert route == ROUTE_OURS and "asymmetric" in why
    assert cuda_route(QuantScheme(4, 0, True), "auto_round:auto_gptq", 4096, 4096, 90)[0] == ROUTE_OURS
    assert cuda_route(w4, "auto_round:auto_gptq", 4096, 4096, None)[0] == ROUTE_OURS  # CPU


def test_kernel_through_selector_matches_reference():
    from autoround.quantizer.formats.packing import pack_gptq_qweight, pack_gptq_qzeros, unpack_gptq_qweight

    torch.manual_seed(0)
    scheme = QuantScheme(4, 32, True)
    info = choose_kernel(scheme, "auto_round:auto_gptq", 64, 96, "cpu", torch.float32)
    assert info.name  # whichever kernel the selector prefers on this machine
    with pytest.raises(BackendError, match="no kernel"):
        choose_kernel(QuantScheme(4, 32, True), "auto_round:auto_gptq", 64, 96, "hpu", torch.float32)

    shapes = expected_shapes(scheme, 64, 96)
    q = torch.randint(0, 16, (96, 64), dtype=torch.uint8)
    qweight = pack_gptq_qweight(q, 4)
    zeros = torch.full((2, 96), 7, dtype=torch.int32)
    tensors = {
        "qweight": qweight,
        "qzeros": pack_gptq_qzeros(zeros, 4),
        "scales": (torch.rand(2, 96) * 0.01 + 0.001).half(),
    }
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    bias = torch.randn(96)
    module = build_kernel(info, scheme, 1, tensors, 64, 96, bias, torch.float32, "cpu", "x")
    x = torch.randn(3, 64)
    g = torch.arange(64) // 32
    w = (unpack_gptq_qweight(qweight, 4, 64).float() - 8) * tensors["scales"].float().t()[:, g]
    torch.testing.assert_close(module(x), x @ w.t() + bias, rtol=1e-4, atol=1e-4)

    bad = dict(tensors, scales=tensors["scales"][:1])
    with pytest.raises(ModelLoadError, match=r"x\.scales has shape \(1, 96\).*needs \(2, 96\)"):
        build_kernel(info, scheme, 1, bad, 64, 96, None, torch.float32, "cpu", "x")


# --- loading helpers shared by the vLLM and SGLang methods ----------------------------------------------
def test_checkpoint_shapes_per_shard_and_packing():
    from autoround.engine_common import checkpoint_shape, is_awq_layout

    s4 = QuantScheme(4, 128, True)
    sizes = [576, 192, 192]  # q, k, v of SmolLM2
    assert checkpoint_shape("qweight", s4, 576, sizes, "k") == (72, 192)
    assert checkpoint_shape("qzeros", s4, 576, sizes, "q") == (5, 72)  # ragged last group counts
    assert checkpoint_shape("scales", s4, 576, sizes, None) == (5, 960)  # a checkpoint that stores qkv fused
    assert checkpoint_shape("g_idx", s4, 576, sizes, "v") == (576,)
    assert checkpoint_shape("qweight", s4, 576, sizes, "x") is None
    assert checkpoint_shape("qweight", s4, 1536, [576], None, "auto_round:auto_awq") == (1536, 72)
    assert checkpoint_shape("qweight", QuantScheme(3, 64, True), 576, [1536, 1536], 1) == (54, 1536)
    assert is_awq_layout("awq") and is_awq_layout("auto_round:auto_awq") and not is_awq_layout("auto_round")


def test_part_names_and_missing_after_load():
    from autoround.engine_common import expected_shard_ids, missing_after_load, part_name

    p = planner()
    qkv = p.plan("model.layers.0.self_attn.qkv_proj")
    assert expected_shard_ids(3, qkv=True) == ["q", "k", "v"]
    assert expected_shard_ids(2, qkv=False) == [0, 1]
    assert expected_shard_ids(1, qkv=False) == [None]
    assert part_name(qkv, "k") == "model.layers.0.self_attn.k_proj"
    assert part_name(qkv, None) == "model.layers.0.self_attn.qkv_proj"
    loaded = {(t, s) for t in ("qweight", "qzeros", "scales") for s in "qkv"} - {("qzeros", "v")}
    err = missing_after_load(qkv, ["q", "k", "v"], loaded)
    assert isinstance(err, ModelLoadError) and "model.layers.0.self_attn.v_proj.qzeros" in str(err)
    assert missing_after_load(qkv, ["q", "k", "v"], loaded | {("qzeros", None)}) is None  # fused on disk


def test_g_idx_and_partition_checks():
    from autoround.engine_common import check_g_idx, check_partition, plain_g_idx, resolve_backend

    assert plain_g_idx(6, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert plain_g_idx(4, -1).tolist() == [0, 0, 0, 0]
    check_g_idx("x", plain_g_idx(256, 128), 128)
    with pytest.raises(ModelLoadError, match="act-order"):
        check_g_idx("x", plain_g_idx(256, 128).flip(0), 128)
    plan = planner(extra={"model.layers.0.mlp.down_proj": {"bits": 3}}).plan("model.layers.0.mlp.down_proj")
    check_partition(plan, 1536, 1536, 576)
    with pytest.raises(SchemeError, match="does not divide"):
        check_partition(plan, 100, 200, 576)
    with pytest.raises(SchemeError, match="whole int32 words"):
        check_partition(plan, 1536, 1536, 100)
    assert resolve_backend(None) == "auto" and resolve_backend("auto_round:gptq") == "auto"
    with pytest.raises(SchemeError, match="valid backends"):
        resolve_backend("nope")


# --- the packed-linear core both engines' methods mix in, driven by a fake engine -----------------------
class _FakeParam(torch.nn.Parameter):
    """Stands in for the engines' parameter classes (same constructor keywords)."""

    def __new__(cls, data, weight_loader, **dims):
        param = super().__new__(cls, data, requires_grad=False)
        param.weight_loader = weight_loader
        param.dims = dims
        return param


class _Packed(_FakeParam): pass  # noqa: E701
class _PackedColumn(_FakeParam): pass  # noqa: E701
class _ChannelScale(_FakeParam): pass  # noqa: E701
class _GroupScale(_FakeParam): pass  # noqa: E701
class _Row(_FakeParam): pass  # noqa: E701


def _fake_method_class(tp: int = 1):
    from autoround.packed_linear import EngineHooks, PackedLinear, ParamKinds

    class FakeMethod(PackedLinear):
        engine = EngineHooks("Fake", ParamKinds(_Packed, _PackedColumn, _ChannelScale, _GroupScale, _Row),
                             device=lambda: "cpu", tp_size=lambda layer: tp, is_qkv=lambda layer: False)

    return FakeMethod


def _fake_config(**changes):
    from autoround.packed_linear import AutoRoundConfigBase

    cfg = AutoRoundConfigBase()
    cfg.packed_modules_mapping = {}
    cfg.setup(dict(BASE, **changes))
    return cfg


def _column_loader(out_sizes, bits):
    """A merged column layer's loader as the engines write it: shard ``i`` goes to its output slice (in packed
    words where the output dimension is the packed one); a parameter without an output dimension is copied."""
    from autoround.engine_common import shard_index

    def load(param, weight, shard_id=None):
        dims = param.dims
        if "output_dim" not in dims or shard_id is None:
            param.data.copy_(weight)
            return
        idx = shard_index(shard_id)
        offset, size = sum(out_sizes[:idx]), out_sizes[idx]
        if dims.get("packed_dim") == dims["output_dim"]:
            offset, size = offset * bits // 32, size * bits // 32
        param.data.narrow(dims["output_dim"], offset, size).copy_(weight)

    return load


_LAYOUTS = [("auto_round:auto_gptq", True), ("auto_round:auto_awq", False)]
GATE_UP = "model.layers.0.mlp.gate_up_proj"


def _part_tensors(plan, part, w, packing):
    from autoround.quantizer.formats import QuantizedLayer
    from autoround.quantizer.formats.auto_round import AutoRoundFormat
    from autoround.quantizer.qmath import quantize_weight

    s = plan.scheme
    qw = quantize_weight(w, s.bits, s.group_size, s.sym)
    tensors = AutoRoundFormat().layer_tensors(QuantizedLayer(part, s, qw, None, w.shape[1], w.shape[0]), packing)
    return tensors, qw.dequantize()


def _fused_layer(packing, sym, out_sizes=(64, 96), in_features=128):
    cfg = _fake_config(packing_format=packing, sym=sym, group_size=32)
    plan = cfg.linear_plan(GATE_UP)
    method = _fake_method_class()(cfg, plan)
    layer = torch.nn.Module()
    method.create_weights(layer, in_features, list(out_sizes), in_features, sum(out_sizes), torch.float32,
                          weight_loader=_column_loader(list(out_sizes), plan.scheme.bits))
    return method, layer, plan


@pytest.mark.parametrize("packing,sym", _LAYOUTS)
def test_packed_linear_loads_a_fused_layer_in_either_layout(packing, sym):
    torch.manual_seed(0)
    method, layer, plan = _fused_layer(packing, sym)
    awq = "awq" in packing
    kinds = {n: type(p).__name__ for n, p in layer.named_parameters()}
    want = {"qweight": "_Packed", "qzeros": "_PackedColumn", "scales": "_ChannelScale"}
    assert kinds == (want if awq else dict(want, g_idx="_Row"))
    assert tuple(layer.qweight.shape) == ((128, 160 // 8) if awq else (128 // 8, 160))
    assert layer.qweight.dims["packed_dim"] == (1 if awq else 0)
    assert tuple(layer.qzeros.shape) == (4, 20) and tuple(layer.scales.shape) == (4, 160)
    ref = []
    for shard, (part, out) in enumerate(zip(plan.parts, (64, 96))):
        tensors, deq = _part_tensors(plan, part, torch.randn(out, 128), packing)
        ref.append(deq)
        if not awq:
            tensors["g_idx"] = torch.arange(128, dtype=torch.int32) // 32
        tensors["scales"] = tensors["scales"].float()  # another writer's fp32 scales load too
        for key, t in tensors.items():
            getattr(layer, key).weight_loader(getattr(layer, key), t, shard)
    method.process_weights_after_loading(layer)
    assert not any(hasattr(layer, t) for t in ("qweight", "qzeros", "scales", "g_idx"))
    assert layer._ar_kernel_name and "_ar_kernel" not in dict(layer.named_modules())
    x = torch.randn(3, 128)
    bias = torch.randn(160)
    torch.testing.assert_close(method.apply(layer, x, bias), x @ torch.cat(ref).t() + bias, rtol=1e-4, atol=1e-4)
    method.process_weights_after_loading(layer)  # a second call keeps the kernel


@pytest.mark.parametrize("packing,sym", _LAYOUTS)
def test_packed_linear_checks_what_it_loads(packing, sym):
    torch.manual_seed(0)
    method, layer, plan = _fused_layer(packing, sym)
    up = "model.layers.0.mlp.up_proj"
    tensors, _ = _part_tensors(plan, up, torch.randn(96, 128), packing)
    with pytest.raises(ModelLoadError, match=rf"{up}\.scales has shape \(3, 96\).*\(4, 96\)"):
        layer.scales.weight_loader(layer.scales, tensors["scales"][:3], 1)
    if "awq" not in packing:
        with pytest.raises(ModelLoadError, match="act-order"):
            layer.g_idx.weight_loader(layer.g_idx, (torch.arange(128, dtype=torch.int32) // 32).flip(0), 1)
    for key in ("qweight", "scales"):  # qzeros of up_proj and everything of gate_proj never arrive
        getattr(layer, key).weight_loader(getattr(layer, key), tensors[key], 1)
    with pytest.raises(ModelLoadError, match=r"missing quantized tensors: .*gate_proj\.qweight.*up_proj\.qzeros"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize("packing,sym", _LAYOUTS)
def test_packed_linear_lm_head_takes_its_rank_slice_of_the_vocabulary(packing, sym):
    from types import SimpleNamespace

    torch.manual_seed(0)
    cfg = _fake_config(packing_format=packing, sym=sym, group_size=32,
                       extra_config={"lm_head": {"bits": 4, "group_size": 32, "sym": sym}})
    plan = cfg.linear_plan("lm_head")
    vocab, hidden, padded = 96, 64, 56  # rank 1 of 2: vocabulary 48..95, padded to 56 rows
    method = _fake_method_class(tp=2)(cfg, plan, lm_head=True)
    layer = torch.nn.Module()
    layer.org_vocab_size = vocab
    layer.shard_indices = SimpleNamespace(org_vocab_start_index=48, org_vocab_end_index=96)
    method.create_weights(layer, hidden, [padded], hidden, 2 * padded, torch.float32,
                          weight_loader=lambda *a: pytest.fail("the engine's embedding loader is not used"))
    tensors, deq = _part_tensors(plan, "lm_head", torch.randn(vocab, hidden), packing)
    for key, t in tensors.items():
        getattr(layer, key).weight_loader(getattr(layer, key), t)
    assert not layer.scales[:, 48:].any()  # the padding rows stay zero
    method.process_weights_after_loading(layer)
    x = torch.randn(2, hidden)
    torch.testing.assert_close(method.apply(layer, x)[:, :48], x @ deq[48:].t(), rtol=1e-4, atol=1e-4)


def test_config_base_float_rule_routes_and_report():
    from autoround.packed_linear import layer_report

    cfg = _fake_config(extra_config={"model.layers.0.self_attn.o_proj": {"bits": 16}})
    assert repr(cfg) == "AutoRoundConfigBase(W4A16 int group 128 sym, packing=auto_round:auto_gptq)"
    assert cfg.get_name() == "auto-round" and "quantize_config.json" in cfg.get_config_filenames()
    assert cfg.override_quantization_method({"quant_method": "auto-round"}, None) == "auto-round"
    assert cfg.linear_plan("model.layers.0.self_attn.o_proj") is None  # float: the engine's own method
    assert cfg.linear_plan("lm_head") is None
    cfg.planner.set_tensor_names({"model.layers.1.mlp.down_proj.qweight"})
    with pytest.raises(ModelLoadError, match=r"down_proj\.qzeros"):
        cfg.linear_plan("model.layers.1.mlp.down_proj")
    plan = _fake_config().linear_plan("model.layers.0.mlp.down_proj")
    assert cfg.engine_kernels_fit("Fake", plan, 4096, 4096, 90)
    assert not cfg.engine_kernels_fit("Fake", plan, 4096, 4096, None)
    awq = _fake_config(packing_format="auto_round:auto_awq", sym=False, group_size=64)
    assert not awq.engine_kernels_fit("Fake", awq.linear_plan("model.layers.0.mlp.down_proj"), 4096, 4096, 90)
    experts = _fake_config().moe_plan("model.layers.0.mlp.experts", 2, True, "Fake")
    assert _fake_config().engine_moe_fits(experts, True) and not _fake_config().engine_moe_fits(experts, False)
    # off CUDA the experts are refused for what they are, before their tensors are looked for
    missing = _fake_config()
    missing.planner.set_tensor_names({"model.layers.1.mlp.down_proj.qweight"})
    with pytest.raises(SchemeError, match="Fake's GPTQ-Marlin MoE kernels"):
        missing.moe_plan("model.layers.0.mlp.experts", 2, False, "Fake")
    with pytest.raises(ModelLoadError, match="missing quantized expert tensors"):
        missing.moe_plan("model.layers.0.mlp.experts", 2, True, "Fake")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for i, m in enumerate(model):
        m.quant_method = _fake_method_class()(cfg, plan) if i else object()
        if i:
            m._ar_kernel_name = "torch"
    assert layer_report(model) == {"object": 1, "FakeMethod[torch]": 2}
