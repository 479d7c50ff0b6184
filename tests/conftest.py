"""Shared fixtures: tiny config-built models for unit tests, the real SmolLM2 for integration tests."""

from __future__ import annotations

import os

import pytest
import torch

from arhelpers import tiny_llama

# tests must never reach the hub: fail fast instead of waiting for timeouts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a child process per calibration_batch() call costs seconds of imports; the one test of that path turns it on
os.environ.setdefault("AR_DISABLE_DATASET_SUBPROCESS", "1")


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
