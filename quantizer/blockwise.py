"""The block-by-block SignRound loop: for each decoder block in turn, the float block's outputs become the
targets, ``signround.tune_block`` tunes the block's layers on the quantized path's inputs, the tuned weights
replace the float ones, and both paths move on to the next block.

The loop knows the order and the resume store; the activations live in ``activations.ActivationCache``, and how
a block runs (device, amp, batches, compile, where tuned weights are held) is ``block_runner.BlockRunner``'s."""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import act_quant
from .act_quant import needs_amax
from .activations import ActivationCache, ActivationStore
from .block_runner import BlockRunner, resolve_amp
from .data import whole_batches
from .devices import SINGLE_DEVICE, Placement, placed, to_device
from .qmath import ROUND_WITH_COMPUTED
from .distributed import SINGLE, Group, Shard
from .formats import QuantizedLayer
from .importance import ImportanceHooks
from .resume import ResumeStore
from .schemes import QuantScheme
from .signround import SignRoundOptions, searches_range, tune_block
from ..log import logger
from ..memory import peak_rss_gib, release_host_memory


def signround_blocks(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    schemes: Mapping[str, QuantScheme],
    calib: torch.Tensor,
    options: SignRoundOptions,
    enable_quanted_input: bool = True,
    loss_mask: torch.Tensor | None = None,
    resume: ResumeStore | None = None,
    cache_device: torch.device | str | None = None,
    compile_forward: bool = False,
    lm_head: tuple[str, nn.Module, nn.Module] | None = None,
    stream: Any = None,
    group: Group = SINGLE,
    store: ActivationStore | None = None,
    placement: Placement = SINGLE_DEVICE,
) -> dict[str, QuantizedLayer]:
    """Tune every block; each block's weights become their fake-quantized values in place.

    ``loss_mask``: ``[n, seqlen]`` bool, positions that count in the loss.  ``resume``: finished blocks are
    loaded from it instead of tuned, and every newly tuned block is saved to it.  ``cache_device``: where the
    cached activations live (default: the model's device; "cpu" for ``low_gpu_mem_usage``).
    ``compile_forward``: ``torch.compile`` the block forward used while tuning.  ``lm_head``: (name, final
    norm, lm_head) to tune the output projection on the last block's outputs after the blocks.  ``stream``:
    streamed tuning's ``streaming.BlockStream``, whose ``open`` reads a block's weights before it runs and whose
    ``close`` packs its layers and drops its weights after.  ``group`` (``distributed.Group``, torchrun): this
    rank carries its share of the samples through the blocks and every tuning step is summed over the ranks
    (``signround.tune_block``'s ``shard``); the resume store is rank 0's, its blocks broadcast to the others.
    ``store``: where the cached activations live (default: ``ActivationStore()``, which offloads them to files when
    they would not fit in memory).  ``placement`` (``devices.Placement``, a ``device_map`` naming several devices,
    or one accelerator under streamed tuning): each block runs on its main device with its layers spread over the
    devices (``devices.placed``), and goes back, with its quantized layers, where it was once done.

    With ``options.amp`` the tuning steps and the quantized path's forward run under bf16 autocast, as the
    reference does; the float targets stay in the model's dtype (``BlockRunner``).
    """
    bs, n = whole_batches(len(calib), options.batch_size)
    if n < len(calib):
        logger.warning("using %d of %d calibration samples (a multiple of batch_size %d)", n, len(calib), bs)
    calib = calib[:n]
    if loss_mask is not None:
        loss_mask = loss_mask[:n]
    shard = Shard(group, n) if group.active else None
    store = store or ActivationStore()
    try:
        return _signround_blocks(model, blocks, schemes, calib, options, enable_quanted_input, loss_mask, resume,
                                 cache_device, compile_forward, lm_head, stream, group, store, shard, bs, placement)
    finally:
        store.close()


def _signround_blocks(model, blocks, schemes, calib, options, enable_quanted_input, loss_mask, resume, cache_device,
                      compile_forward, lm_head, stream, group, store, shard, bs, placement):
    acts = ActivationCache(model, blocks[0][1], calib, bs, cache_device, shard, store)
    result: dict[str, QuantizedLayer] = {}
    start = time.time()
    options = resolve_amp(options, acts.device)
    runner = BlockRunner(acts.device, acts.kwargs, bs, options.amp, compile_forward, acts.kwargs_batch, store)

    def next_inputs(block: nn.Module, fp_out: torch.Tensor) -> None:
        q_out = runner.run_quantized(block, acts.q) if enable_quanted_input else fp_out
        acts.advance(fp_out, q_out)

    bar = tqdm(blocks, desc="SignRound blocks")

    def tune_one(block_name: str, block: nn.Module, layers: dict[str, QuantScheme]) -> dict[str, QuantizedLayer]:
        # the float forward measures the input importance of the layers whose tuning starts from a searched range
        # (and the input amax of the layers whose activations take a static scale)
        hooked = [rel for rel, s in layers.items() if searches_range(s, options) or needs_amax(s)]
        with ImportanceHooks.of_block(block, hooked) as hooks:
            fp_out = runner.run_float(block, acts.fp)
        hooks.reduce(group)
        amax = act_quant.static_amax(layers, hooks.amax)
        if not layers:
            next_inputs(block, fp_out)
            return {}
        if group.broadcast(resume is not None and resume.has(block_name)):
            saved = resume.load_block(block_name) if group.is_main else None
            weights, (loss_before, loss_best), ratios = group.broadcast(saved)
            logger.info("%s: loaded from the resume state (loss %.6g -> %.6g)", block_name, loss_before, loss_best)
        else:
            tuned = tune_block(
                block, layers, acts.q if enable_quanted_input else acts.fp, fp_out, options,
                forward=runner.tuning_forward,
                progress=lambda it, loss, best: bar.set_postfix(loss=f"{loss:.3g}", best=f"{best:.3g}", refresh=False),
                loss_mask=loss_mask,
                importance=hooks.result(),
                input_amax=amax,
                shard=shard,
                device=runner.device,
            )
            weights, loss_before, loss_best, ratios = tuned.weights, tuned.loss_before, tuned.loss_best, tuned.act_ratios
            logger.info(
                "%s: loss %.6g (start) -> %.6g (tuned, best of %d iterations)",
                block_name, loss_before, loss_best, options.iters,
            )
            if resume is not None and group.is_main:
                resume.save_block(block_name, weights, (loss_before, loss_best), ratios)
        # tuned activation clip ratios: a static scale's is taken into its amax (what the checkpoint stores), a
        # dynamic one's stays with the layer (applied in memory; no format can carry it)
        dynamic = {}
        for rel, ratio in ratios.items():
            if layers[rel].act_dynamic:
                dynamic[rel] = ratio
            else:
                amax[rel] = amax[rel] * ratio[0]
        if ratios:
            logger.debug("%s: activation clip ratios %s", block_name,
                         ", ".join(f"{r}={m:.3f}" for r, (m, _) in ratios.items()))
        done: dict[str, QuantizedLayer] = {}
        for rel, qw in weights.items():
            module = block.get_submodule(rel)
            runner.commit(module, qw)
            # the quantized path sees W4A4-style inputs
            act_quant.install(module, layers[rel], amax.get(rel), dynamic.get(rel))
            full = f"{block_name}.{rel}"
            bias = module.bias.detach().clone() if module.bias is not None else None
            done[full] = QuantizedLayer(full, layers[rel], qw, bias, module.in_features, module.out_features,
                                        amax.get(rel), act_ratio=dynamic.get(rel))
        next_inputs(block, fp_out)
        return done

    for block_name, block in bar:
        if stream is not None:
            stream.open(block_name, block)
        layers = {
            full[len(block_name) + 1 :]: s for full, s in schemes.items() if full.startswith(block_name + ".")
        }
        home = next(block.parameters()).device
        with placed(placement, block_name, block, layers):  # several devices: this block's layers spread over them
            done = tune_one(block_name, block, layers)
        if placement.in_host:  # the tuned layers' tensors follow the block home
            done = to_device(done, home)
        result.update(done)
        if stream is not None:
            if layers:
                runner.forget(block)
            stream.close(block_name, block, done)
        if layers:
            runner.block_done()
    if lm_head is not None and lm_head[0] in schemes:
        result[lm_head[0]] = _tune_lm_head(lm_head, schemes[lm_head[0]], acts.fp, acts.q, options, loss_mask, bs,
                                           acts.device, shard)
        if placement.in_host:  # lm_head goes back to host memory with the modules outside the blocks
            result[lm_head[0]] = to_device(result[lm_head[0]], torch.device("cpu"))
    fp_out = None
    acts.clear()  # the cached activations are no longer needed
    runner.restore_held()
    logger.info(
        "SignRound tuned %d layers in %d blocks in %.1fs; peak RSS %.2f GiB%s",
        len(result), len(blocks), time.time() - start, peak_rss_gib(),
        f", peak accelerator memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() else "",
    )
    return result


def _tune_lm_head(
    lm_head: tuple[str, nn.Module, nn.Module],
    scheme: QuantScheme,
    fp_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    options: SignRoundOptions,
    loss_mask: torch.Tensor | None,
    bs: int,
    device: torch.device,
    shard: Shard | None = None,
) -> QuantizedLayer:
    """Tune the output projection on the final-norm outputs; float targets are computed per batch (logits of
    every calibration token would not fit in memory)."""
    name, norm, head = lm_head
    with torch.no_grad():
        fp_x = torch.cat([norm(fp_hidden[i : i + bs].to(device)).to(fp_hidden.device) for i in range(0, len(fp_hidden), bs)])
        q_x = torch.cat([norm(q_hidden[i : i + bs].to(device)).to(q_hidden.device) for i in range(0, len(q_hidden), bs)])
    weight, bias = head.weight.detach(), head.bias.detach() if head.bias is not None else None

    @torch.no_grad()
    def targets(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fp_x[idx].to(device), weight, bias)

    holder = nn.ModuleDict({"head": head})
    amax = None
    if needs_amax(scheme):  # a static activation scale: the largest float input, as the blocks' layers take it
        amax = fp_x.abs().amax().to(torch.float32)
        if shard is not None:
            amax = torch.stack(shard.group.gather(amax.reshape(1))).amax()
        amax = act_quant.calibrated_amax(amax)
    tuned = tune_block(
        holder, {"head": scheme}, q_x, targets, options,
        forward=lambda b, x: b["head"](x), loss_mask=loss_mask, shard=shard,
        input_amax={"head": amax} if amax is not None else None,
    )
    logger.info("%s: loss %.6g (start) -> %.6g (tuned)", name, tuned.loss_before, tuned.loss_best)
    qw = tuned.weights["head"]
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    b = head.bias.detach().clone() if head.bias is not None else None
    ratio = tuned.act_ratios.get("head")  # the tuned activation clip ratios
    if ratio is not None and not scheme.act_dynamic:  # a static scale's goes into its amax
        amax, ratio = amax * ratio[0], None
    act_quant.install(head, scheme, amax, ratio)  # the model in memory quantizes its inputs as tuned
    return QuantizedLayer(name, scheme, qw, b, head.in_features, head.out_features, amax, act_ratio=ratio)


def rtn_blocks(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    schemes: Mapping[str, QuantScheme],
    calib: torch.Tensor | None,
    batch_size: int,
    optimized: bool,
    search_lowest: float,
    stream: Any = None,
    cache_device: torch.device | str | None = None,
    group: Group = SINGLE,
    store: ActivationStore | None = None,
    placement: Placement = SINGLE_DEVICE,
    rtn_rounding: str = ROUND_WITH_COMPUTED,
) -> dict[str, QuantizedLayer]:
    """Round every block's planned layers to nearest, block by block on the float path: the block's float
    forward measures the input importance (``optimized``: optimized RTN's scale search) and the input amax of
    static activation scales, exactly as the whole model's forward would (``importance.model_importance``).
    What streamed tuning runs for iters 0; ``stream`` as in ``signround_blocks``.  ``calib`` None: plain RTN of
    layers that need no activation statistics, no forward at all.  ``group``: each rank runs its share of
    the samples and the statistics are reduced over the ranks, so every rank rounds alike.  ``store`` and ``placement``:
    as in ``signround_blocks``.  ``rtn_rounding``: ``LayerPlan.rtn_rounding``."""
    store = store or ActivationStore()
    try:
        return _rtn_blocks(model, blocks, schemes, calib, batch_size, optimized, search_lowest, stream, cache_device,
                           group, store, placement, rtn_rounding)
    finally:
        store.close()


def _rtn_blocks(model, blocks, schemes, calib, batch_size, optimized, search_lowest, stream, cache_device, group,
                store, placement, rtn_rounding):
    from .plan import LayerPlan
    from .quantize import quantize_layers

    acts = runner = None
    if calib is not None:
        bs, n = whole_batches(len(calib), batch_size)
        if n < len(calib):  # the blocks run with the keyword arguments (masks) of one whole batch
            logger.warning("using %d of %d calibration samples (a multiple of batch_size %d)", n, len(calib), bs)
        acts = ActivationCache(model, blocks[0][1], calib[:n], bs, cache_device,
                               Shard(group, n) if group.active else None, store)
        runner = BlockRunner(acts.device, acts.kwargs, bs, amp=False, kwargs_batch=acts.kwargs_batch, store=store)
    result: dict[str, QuantizedLayer] = {}
    start = time.time()
    for block_name, block in tqdm(blocks, desc="optimized RTN blocks" if optimized else "RTN blocks"):
        if stream is not None:
            stream.open(block_name, block)
        layers = {
            full[len(block_name) + 1 :]: s for full, s in schemes.items() if full.startswith(block_name + ".")
        }
        hooked = [rel for rel, s in layers.items() if optimized or needs_amax(s)]
        home = next(block.parameters()).device
        # several devices: the block runs, and its layers are rounded, where ``placement`` puts them
        with placed(placement if runner is not None else SINGLE_DEVICE, block_name, block, layers):
            with ImportanceHooks.of_block(block, hooked) as hooks:
                fp_out = runner.run_float(block, acts.fp) if runner is not None else None
            hooks.reduce(group)
            importance = {f"{block_name}.{rel}": v for rel, v in hooks.result().items()} if optimized else None
            amax = {f"{block_name}.{rel}": a for rel, a in act_quant.static_amax(layers, hooks.amax).items()}
            linears = {f"{block_name}.{rel}": block.get_submodule(rel) for rel in layers}
            plan = LayerPlan(quantize={f"{block_name}.{rel}": s for rel, s in layers.items()},
                             rtn_rounding=rtn_rounding)
            done = quantize_layers(linears, plan, importance, search_lowest, amax) if layers else {}
        if placement.in_host:
            done = to_device(done, home)
        result.update(done)
        if acts is not None:
            acts.advance(fp_out, fp_out)
        fp_out = None
        if stream is not None:
            stream.close(block_name, block, done)
        release_host_memory()
    if acts is not None:
        acts.clear()
    logger.info("rounded %d layers in %d blocks in %.1fs; peak RSS %.2f GiB", len(result), len(blocks),
                time.time() - start, peak_rss_gib())
    return result
