"""Vision-language models: the text decoder is quantized by default and the vision tower stays float;
``quant_nontext_module=True`` quantizes the tower too (plain RTN); checkpoints load back through our loader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from autoround import AutoRound
from autoround.quantizer.errors import AutoRoundError

CALIB = [torch.randint(0, 200, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
DATA = dict(dataset=CALIB, nsamples=4, seqlen=32, batch_size=2)
IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(9))
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2),
        vocab_size=256, image_token_id=250, video_token_id=251, vision_start_token_id=252,
    )
    return Qwen2VLForConditionalGeneration(cfg).eval(), "model.visual.blocks"


def llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(text_config={"model_type": "llama", **TEXT},
                      vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14),
                      image_token_index=250, vocab_size=256)
    return LlavaForConditionalGeneration(cfg).eval(), "model.vision_tower.encoder.layers"


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("build", [qwen2_vl, llava])
def test_text_decoder_quantized_vision_tower_float_and_loads_back(tmp_path, build):
    from autoround import AutoRoundConfig  # noqa: F401  (registers the loader)

    m, tower = build()
    vision_before = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith(tower)}
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=1, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    assert ar.pipeline.block_names == ["model.language_model.layers"]
    assert ar.layers and all(n.startswith("model.language_model.layers.") for n in ar.layers)
    assert all(torch.equal(p, vision_before[n]) for n, p in ar.model.named_parameters() if n in vision_before)
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [qwen2_vl, llava])
def test_quant_nontext_module_quantizes_the_tower_too(tmp_path, build):
    from autoround import AutoRoundConfig  # noqa: F401

    m, tower = build()
    ar = AutoRound(m, scheme="W4A16", group_size=32, iters=0, quant_nontext_module=True, **DATA)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ckpt"), format="auto_round")
    vision = [n for n in ar.layers if n.startswith(tower)]
    assert vision and any(n.startswith("model.language_model.") for n in ar.layers)
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    layer = loaded.get_submodule(vision[0])
    assert hasattr(layer, "kernel_name")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), ar.model.get_submodule(vision[0])(x), atol=1e-5)
    assert torch.allclose(_logits(loaded), _logits(ar.model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("iters", [0, 2])
def test_static_activation_tower_layers_that_no_text_reaches_are_refused_by_name_before_work(iters):
    """FP8_STATIC with quant_nontext_module: text calibration never reaches the vision tower, so its layers have
    no input range for a static scale: refused naming one (SignRound before tuning, RTN after calibrating)."""
    m, tower = llava()
    ar = AutoRound(m, scheme="FP8_STATIC", iters=iters, quant_nontext_module=True, **DATA)
    why = (rf"{tower}\.\d+\.\S+ is planned as .* outside the blocks SignRound calibrates" if iters else
           rf"12 layer\(s\) with a static activation scale saw no calibration token \(e.g. {tower}\.0\.")
    with pytest.raises(AutoRoundError, match=why):
        ar.quantize()
    assert not ar.quantized and not ar.layers


def test_quant_nontext_module_on_a_text_model_is_refused():
    from arhelpers import tiny_llama

    with pytest.raises(AutoRoundError, match="no vision/audio blocks"):
        AutoRound(tiny_llama(), scheme="W4A16", quant_nontext_module=True, iters=0, **DATA).quantize()


def test_vlm_folder_loads_through_the_image_text_class(tmp_path):
    m, _ = qwen2_vl()
    m.save_pretrained(tmp_path / "vlm")
    ar = AutoRound(str(tmp_path / "vlm"), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True,
                   disable_model_free=True)
    ar.quantize()
    assert type(ar.model).__name__ == "Qwen2VLForConditionalGeneration" and ar.layers
