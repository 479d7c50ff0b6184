"""The block-by-block SignRound loop: capture block 0's inputs and keyword arguments with a hook, then tune each
decoder block in turn, carrying the float and the quantized activations forward."""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import QuantizedLayer
from .model_io import decoder_body
from .schemes import QuantScheme
from .signround import SignRoundOptions, tune_block
from ..log import logger


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after block 0's inputs are seen."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering ``first_block`` for every calibration sample, and the keyword arguments (masks,
    position embeddings) the model passes it for one batch of ``batch_size`` samples."""
    hidden: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.detach())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    body = decoder_body(model)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(calib), batch_size):
            try:
                body(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen["use_cache"] = False
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return torch.cat(hidden), kwargs_seen


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _run(block: nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any], bs: int) -> torch.Tensor:
    return torch.cat([_first(block(x[i : i + bs], **kwargs)) for i in range(0, len(x), bs)])


def signround_blocks(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    schemes: Mapping[str, QuantScheme],
    calib: torch.Tensor,
    options: SignRoundOptions,
    enable_quanted_input: bool = True,
) -> dict[str, QuantizedLayer]:
    """Tune every block; each block's weights become their fake-quantized values in place."""
    bs = min(options.batch_size, len(calib))
    n = (len(calib) // bs) * bs
    if n < len(calib):
        logger.warning("using %d of %d calibration samples (a multiple of batch_size %d)", n, len(calib), bs)
    calib = calib[:n]
    fp_in, kwargs = capture_block_inputs(model, blocks[0][1], calib, bs)
    q_in = fp_in
    result: dict[str, QuantizedLayer] = {}
    start = time.time()
    bar = tqdm(blocks, desc="SignRound blocks")
    for block_name, block in bar:
        layers = {
            full[len(block_name) + 1 :]: s for full, s in schemes.items() if full.startswith(block_name + ".")
        }
        fp_out = _run(block, fp_in, kwargs, bs)
        if not layers:
            q_in = _run(block, q_in, kwargs, bs) if enable_quanted_input else fp_out
            fp_in = fp_out
            continue
        inputs = q_in if enable_quanted_input else fp_in
        tuned = tune_block(
            block, layers, inputs, fp_out, options,
            forward=lambda b, x: _first(b(x, **kwargs)),
            progress=lambda it, loss, best: bar.set_postfix(loss=f"{loss:.3g}", best=f"{best:.3g}", refresh=False),
        )
        logger.info(
            "%s: loss %.6g (RTN) -> %.6g (tuned, best of %d iterations)",
            block_name, tuned.loss_before, tuned.loss_best, options.iters,
        )
        for rel, qw in tuned.weights.items():
            module = block.get_submodule(rel)
            with torch.no_grad():
                module.weight.copy_(qw.dequantize().to(module.weight.dtype))
            full = f"{block_name}.{rel}"
            bias = module.bias.detach().clone() if module.bias is not None else None
            result[full] = QuantizedLayer(full, layers[rel], qw, bias, module.in_features, module.out_features)
        q_in = _run(block, q_in, kwargs, bs) if enable_quanted_input else fp_out
        fp_in = fp_out
    logger.info("SignRound tuned %d layers in %d blocks in %.1fs", len(result), len(blocks), time.time() - start)
    return result
