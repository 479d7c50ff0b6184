"""The block loop is model-agnostic: tiny config-built models of every supported family are found, tuned block by
block (SignRound), saved and loaded back through transformers with the same logits."""

import pytest
import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16,
                                                        "sliding_window": 16}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}


def build(family: str):
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    common = dict(vocab_size=256, tie_word_embeddings=False)
    if family == "gpt2":
        common.update(n_embd=64, n_layer=2, n_head=4, n_positions=128)
    elif family == "opt":
        common.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    else:
        common.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128)
    cfg = getattr(transformers, cfg_name)(**common, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(cfg).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_signround_save_load(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from autoround import AutoRound

    model = build(family)
    calib = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ar = AutoRound(model, scheme="W4A16", group_size=32, iters=2, dataset=calib, nsamples=4, seqlen=16, batch_size=2)
    _, (out,) = ar.quantize_and_save(str(tmp_path / family))
    assert len(ar.layers) >= 4 * 2, sorted(ar.layers)  # at least 4 linears per block were quantized
    ids = torch.stack(calib[:2])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ar.model(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_tensors_the_model_class_never_instantiates_are_copied(tmp_path):
    """A DeepSeek-V3-style extra layer (a multi-token-prediction block the class skips) stays in the checkpoint,
    byte for byte, in every format written from the loaded model."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from autoround import AutoRound
    from arhelpers import tiny_llama

    src = tmp_path / "src"
    tiny_llama(hidden=64, inter=128).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    extra = {"model.layers.2.mtp.eh_proj.weight": torch.randn(64, 128), "model.layers.2.mtp.norm.weight": torch.ones(64)}
    save_file({**tensors, **extra}, src / "model.safetensors", metadata={"format": "pt"})
    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ar = AutoRound(str(src), scheme="W4A16", group_size=32, iters=0, dataset=calib, nsamples=4, seqlen=32,
                   disable_model_free=True)
    assert set(ar.pipeline.source_tensors) == set(extra)
    _, folders = ar.quantize_and_save(str(tmp_path / "out"), format="auto_round,fake")
    for folder in folders:
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            for k, v in extra.items():
                assert torch.equal(f.get_tensor(k), v), (folder, k)
