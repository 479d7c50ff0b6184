"""Shared fixtures: tiny config-built models for unit tests, the real SmolLM2 for integration tests."""

from __future__ import annotations

import os

import pytest
import torch

# tests must never reach the hub: fail fast instead of waiting for timeouts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(hidden: int = 64, inter: int = 160, layers: int = 2, vocab: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (32,), generator=g) for _ in range(8)]


@pytest.fixture(scope="session")
def smollm2_folder():
    from autoround.quantizer.assets import smollm2_folder as get

    try:
        return get()
    except Exception as exc:  # pragma: no cover - only when the asset package is absent
        pytest.skip(f"SmolLM2 asset unavailable: {exc}")
