"""Perplexity on local text: no network, no lm-eval needed."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import DatasetError


def windows(token_ids: torch.Tensor, seqlen: int, n_windows: int | None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows from a 1-D token stream."""
    ids = token_ids.reshape(-1)
    available = ids.numel() // seqlen
    if available == 0:
        raise DatasetError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if n_windows is None else min(n_windows, available)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(
    model: Any,
    token_ids: torch.Tensor,
    seqlen: int = 512,
    n_windows: int | None = 40,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``token_ids``."""
    wins = windows(token_ids, seqlen, n_windows)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(wins), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = wins[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def text_perplexity(model: Any, tokenizer: Any, text: str, seqlen: int = 512, n_windows: int | None = 40, **kw: Any) -> float:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return perplexity(model, ids, seqlen=seqlen, n_windows=n_windows, **kw)
