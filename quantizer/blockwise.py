"""The block-by-block SignRound loop: capture block 0's inputs and keyword arguments with a hook, then tune each
decoder block in turn, carrying the float and the quantized activations forward."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import QuantizedLayer
from .model_io import decoder_body
from .schemes import QuantScheme
from .resume import ResumeStore
from .importance import ImportanceHooks
from .signround import SignRoundOptions, searches_range, tune_block
from ..log import logger
from ..memory import peak_rss_bytes, release_host_memory, release_pages


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


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB."""
    return peak_rss_bytes() / 2**30


# amp on a CPU is refused when bfloat16 matmuls are this many times slower than float32 ones: some CPUs (seen:
# an AMD EPYC with AVX2 and no AVX-512) have no fast bf16 GEMM in torch's CPU libraries, and there a bf16 product
# ran 60x slower than the float32 one (1.1 vs 66 GFLOP/s), where CPUs with one run it faster than float32
CPU_BF16_SLOWDOWN_LIMIT = 2.0


@functools.lru_cache(maxsize=None)
def cpu_matmul_seconds(m: int = 128, k: int = 512, n: int = 512) -> tuple[float, float]:
    """(bfloat16, float32) seconds of one ``[m, k] @ [k, n]`` product on this CPU, best of three after a warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = []
    for dtype in (torch.bfloat16, torch.float32):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        best.append(max(min(times), 1e-9))
    return best[0], best[1]


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
) -> dict[str, QuantizedLayer]:
    """Tune every block; each block's weights become their fake-quantized values in place.

    ``loss_mask``: ``[n, seqlen]`` bool, positions that count in the loss.  ``resume``: finished blocks are
    loaded from it instead of tuned, and every newly tuned block is saved to it.  ``cache_device``: where the
    cached activations live (default: the model's device; "cpu" for ``low_gpu_mem_usage``).
    ``compile_forward``: ``torch.compile`` the block forward used while tuning.  ``lm_head``: (name, final
    norm, lm_head) to tune the output projection on the last block's outputs after the blocks.

    With ``options.amp`` the tuning steps and the quantized path's forward run under bf16 autocast, as the
    reference does; the float targets stay in the model's dtype (bf16 targets cost SmolLM2 W4G64 about 1% of
    perplexity for 3% of the time).  A tuned block's float32 weights then hold their fake-quantized values in
    bfloat16 until all blocks are done (half the memory of the blocks already tuned); they are restored to
    their own dtype, with the exact fake-quantized values, at the end.
    """
    bs = min(options.batch_size, len(calib))
    n = (len(calib) // bs) * bs
    if n < len(calib):
        logger.warning("using %d of %d calibration samples (a multiple of batch_size %d)", n, len(calib), bs)
    calib = calib[:n]
    if loss_mask is not None:
        loss_mask = loss_mask[:n]
    fp_in, kwargs = capture_block_inputs(model, blocks[0][1], calib, bs)
    device = fp_in.device
    if cache_device is not None:
        fp_in = fp_in.to(cache_device)
    q_in = fp_in
    result: dict[str, QuantizedLayer] = {}
    start = time.time()

    if options.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("amp: this GPU has no bfloat16 support; tuning in the model's dtype (pass amp=False to silence)")
        options = dataclasses.replace(options, amp=False)
    if options.amp and device.type == "cpu":
        t_bf16, t_fp32 = cpu_matmul_seconds()
        if t_bf16 > CPU_BF16_SLOWDOWN_LIMIT * t_fp32:
            logger.warning(
                "amp: bfloat16 matmuls run %.0fx slower than float32 on this CPU (%.2g s vs %.2g s for the same "
                "product; no native bfloat16 path in this torch build for it), so tuning runs in the model's dtype "
                "instead of under bf16 autocast (pass amp=False / --disable_amp to silence)",
                t_bf16 / t_fp32, t_bf16, t_fp32,
            )
            options = dataclasses.replace(options, amp=False)
    amp = options.amp

    @torch.no_grad()
    def run(block: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return torch.cat([
                _first(block(x[i : i + bs].to(device), **kwargs)).to(x.device, x.dtype) for i in range(0, len(x), bs)
            ])

    def block_forward(b: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return _first(b(x, **kwargs))

    # (module, dtype, quantized weight) of the weights held in bfloat16 under amp until the end
    held_in_bf16: list[tuple[nn.Module, torch.dtype, Any]] = []

    tuned_forward = _compiled_or_eager(block_forward) if compile_forward else block_forward

    bar = tqdm(blocks, desc="SignRound blocks")
    for block_name, block in bar:
        layers = {
            full[len(block_name) + 1 :]: s for full, s in schemes.items() if full.startswith(block_name + ".")
        }
        # the float forward measures the input importance of the layers whose tuning starts from a searched range
        with ImportanceHooks.of_block(block, [rel for rel, s in layers.items() if searches_range(s, options)]) as hooks:
            fp_out = run(block, fp_in)
        if not layers:
            q_in = run(block, q_in, amp) if enable_quanted_input else fp_out
            fp_in = fp_out
            continue
        if resume is not None and resume.has(block_name):
            weights, (loss_before, loss_best) = resume.load_block(block_name)
            logger.info("%s: loaded from the resume state (loss %.6g -> %.6g)", block_name, loss_before, loss_best)
        else:
            inputs = q_in if enable_quanted_input else fp_in
            tuned = tune_block(
                block, layers, inputs, fp_out, options,
                forward=tuned_forward,
                progress=lambda it, loss, best: bar.set_postfix(loss=f"{loss:.3g}", best=f"{best:.3g}", refresh=False),
                loss_mask=loss_mask,
                importance=hooks.result(),
            )
            weights, loss_before, loss_best = tuned.weights, tuned.loss_before, tuned.loss_best
            logger.info(
                "%s: loss %.6g (start) -> %.6g (tuned, best of %d iterations)",
                block_name, loss_before, loss_best, options.iters,
            )
            if resume is not None:
                resume.save_block(block_name, weights, (loss_before, loss_best))
        for rel, qw in weights.items():
            module = block.get_submodule(rel)
            with torch.no_grad():
                if amp and module.weight.dtype == torch.float32:
                    held_in_bf16.append((module, module.weight.dtype, qw))
                    old = module.weight
                    _replace_weight(module, qw.dequantize().to(torch.bfloat16))
                    release_pages(old)  # a weight mapped from the checkpoint file keeps its pages otherwise
                else:
                    module.weight.copy_(qw.dequantize().to(module.weight.dtype))
            full = f"{block_name}.{rel}"
            bias = module.bias.detach().clone() if module.bias is not None else None
            result[full] = QuantizedLayer(full, layers[rel], qw, bias, module.in_features, module.out_features)
        q_in = run(block, q_in, amp) if enable_quanted_input else fp_out
        fp_in = fp_out
        release_host_memory()  # the block's autograd buffers: otherwise RSS creeps up block after block
    if lm_head is not None and lm_head[0] in schemes:
        result[lm_head[0]] = _tune_lm_head(lm_head, schemes[lm_head[0]], fp_in, q_in, options, loss_mask, bs, device)
    fp_in = q_in = fp_out = None  # the cached activations are no longer needed
    release_host_memory()
    for module, dtype, qw in held_in_bf16:
        with torch.no_grad():
            _replace_weight(module, qw.dequantize().to(dtype))
        release_host_memory()  # the bf16 copy just dropped: keep the heap from holding both
    logger.info(
        "SignRound tuned %d layers in %d blocks in %.1fs; peak RSS %.2f GiB%s",
        len(result), len(blocks), time.time() - start, peak_rss_gib(),
        f", peak accelerator memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() else "",
    )
    return result


def _compiled_or_eager(fn):
    """``torch.compile(fn)``; if compiling fails (an unsupported op, no C++ compiler for the CPU backend), one
    warning with the reason, and the eager ``fn`` from then on."""
    import torch._dynamo  # noqa: F401  (its exception types)

    from .. import envs

    torch._dynamo.config.cache_size_limit = envs.AR_DYNAMO_CACHE_SIZE_LIMIT
    compiled = torch.compile(fn, dynamic=False)
    current = [compiled]

    def forward(*args):
        if current[0] is compiled:
            try:
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as exc:
                reason = " ".join(str(exc).split())[:300]
                logger.warning("torch.compile failed (%s: %s); tuning continues without it", type(exc).__name__, reason)
                current[0] = fn
        return fn(*args)

    return forward


def _replace_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Give ``module`` a new weight tensor (another dtype: ``copy_`` would keep the old one's)."""
    module.weight = nn.Parameter(value.to(module.weight.device), requires_grad=module.weight.requires_grad)


def _tune_lm_head(
    lm_head: tuple[str, nn.Module, nn.Module],
    scheme: QuantScheme,
    fp_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    options: SignRoundOptions,
    loss_mask: torch.Tensor | None,
    bs: int,
    device: torch.device,
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
    tuned = tune_block(
        holder, {"head": scheme}, q_x, targets, options,
        forward=lambda b, x: b["head"](x), loss_mask=loss_mask,
    )
    logger.info("%s: loss %.6g (start) -> %.6g (tuned)", name, tuned.loss_before, tuned.loss_best)
    qw = tuned.weights["head"]
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    b = head.bias.detach().clone() if head.bias is not None else None
    return QuantizedLayer(name, scheme, qw, b, head.in_features, head.out_features)
