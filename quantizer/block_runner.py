"""How the block-by-block loop runs a block: on which device, in which dtype (the amp policy), in batches of
how many samples, with or without ``torch.compile``, and where a tuned block's weights are held until the end
(bfloat16 under amp) and how memory is given back between blocks."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch
from torch import nn

from .options import SignRoundOptions
from ..log import logger
from ..memory import release_host_memory, release_pages

# amp on a CPU is refused when bfloat16 matmuls are this many times slower than float32 ones: on CPUs without a
# native bf16 GEMM in torch's CPU libraries a bf16 product is many times slower than the float32 one, where CPUs
# with one run it faster (docs/benchmarks.md, "amp on a CPU with slow bf16 matmuls")
CPU_BF16_SLOWDOWN_LIMIT = 2.0


@functools.lru_cache(maxsize=None)
def cpu_matmul_seconds(m: int = 128, k: int = 512, n: int = 512, repeats: int = 25) -> tuple[float, float]:
    """(bfloat16, float32) seconds of one ``[m, k] @ [k, n]`` product on this CPU: the fastest of ``repeats``
    after a warm-up, the two dtypes alternating so that a burst of load from other processes slows both alike
    (each product takes well under a millisecond, so one time slice lost to another process would decide it)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    pairs = [(a.to(dtype), b.to(dtype)) for dtype in (torch.bfloat16, torch.float32)]
    for x, y in pairs:
        x @ y
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, (x, y) in enumerate(pairs):
            t0 = time.perf_counter()
            x @ y
            best[i] = min(best[i], time.perf_counter() - t0)
    return max(best[0], 1e-9), max(best[1], 1e-9)


def resolve_amp(options: SignRoundOptions, device: torch.device) -> SignRoundOptions:
    """``options`` with ``amp`` switched off, and one warning saying why, where bf16 autocast would not help on
    ``device``: a GPU without bfloat16, or a CPU whose bf16 matmuls are much slower than float32 ones."""
    if options.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("amp: this GPU has no bfloat16 support; tuning in the model's dtype (pass amp=False to silence)")
        return dataclasses.replace(options, amp=False)
    if options.amp and device.type == "cpu":
        t_bf16, t_fp32 = cpu_matmul_seconds()
        if t_bf16 > CPU_BF16_SLOWDOWN_LIMIT * t_fp32:
            logger.warning(
                "amp: bfloat16 matmuls run %.0fx slower than float32 on this CPU (%.2g s vs %.2g s for the same "
                "product; no native bfloat16 path in this torch build for it), so tuning runs in the model's dtype "
                "instead of under bf16 autocast (pass amp=False / --disable_amp to silence)",
                t_bf16 / t_fp32, t_bf16, t_fp32,
            )
            return dataclasses.replace(options, amp=False)
    return options


def first_output(out: Any) -> torch.Tensor:
    """A block's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """Runs blocks on ``device`` with the model's keyword arguments, ``batch_size`` samples at a time.

    ``amp``: the quantized path and the tuning steps run under bf16 autocast, and a tuned block's float32
    weights hold their fake-quantized values in bfloat16 until ``restore_held`` (half the memory of the blocks
    already tuned); the float path stays in the model's dtype.  ``compile_forward``: the tuning forward goes
    through ``torch.compile`` (eager if compiling fails)."""

    def __init__(
        self, device: torch.device, kwargs: dict[str, Any], batch_size: int, amp: bool, compile_forward: bool = False,
        kwargs_batch: int | None = None, store: Any = None,
    ) -> None:
        self.device, self.kwargs, self.batch_size, self.amp = device, kwargs, batch_size, amp
        # the batch size the keyword arguments were captured with: a smaller batch (a rank's part of a batch in a
        # distributed run) gets their first rows (every calibration row has the same length, so the same masks)
        self.kwargs_batch = kwargs_batch or batch_size
        self.store = store  # ``activations.ActivationStore`` of the outputs (None: in memory)
        self.tuning_forward = compiled_or_eager(self._forward) if compile_forward else self._forward
        # (module, dtype, quantized weight) of the weights held in bfloat16 under amp until the end
        self._held: list[tuple[nn.Module, torch.dtype, Any]] = []

    @torch.no_grad()
    def run(self, block: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        """``block`` over every sample of ``x``; the outputs stay where ``x`` is, in its dtype."""
        bs, device = self.batch_size, self.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            parts = (
                first_output(block(x[i : i + bs].to(device), **self.kwargs_for(len(x[i : i + bs])))).to(x.device, x.dtype)
                for i in range(0, len(x), bs)
            )
            if self.store is None:
                return torch.cat(list(parts))
            return self.store.filled(parts, len(x))

    def kwargs_for(self, n: int) -> dict[str, Any]:
        """The block's keyword arguments for a batch of ``n`` samples."""
        if n >= self.kwargs_batch or self.kwargs_batch == 1:
            return self.kwargs
        return {k: _rows(v, self.kwargs_batch, n) for k, v in self.kwargs.items()}

    def run_float(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The float path: the model's dtype, no autocast."""
        return self.run(block, x)

    def run_quantized(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The quantized path: under bf16 autocast with amp."""
        return self.run(block, x, self.amp)

    def _forward(self, b: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return first_output(b(x, **self.kwargs_for(x.shape[0])))

    @torch.no_grad()
    def commit(self, module: nn.Module, qw: Any) -> None:
        """Give a tuned layer its fake-quantized weight (held in bfloat16 under amp when it is float32)."""
        if self.amp and module.weight.dtype == torch.float32:
            self._held.append((module, module.weight.dtype, qw))
            old = module.weight
            replace_weight(module, qw.dequantize().to(torch.bfloat16))
            release_pages(old)  # a weight mapped from the checkpoint file keeps its pages otherwise
        else:
            module.weight.copy_(qw.dequantize().to(module.weight.dtype))

    def forget(self, block: nn.Module) -> None:
        """Stop holding the weights of ``block``'s layers (streamed tuning drops the block itself)."""
        mine = {id(m) for m in block.modules()}
        self._held = [h for h in self._held if id(h[0]) not in mine]

    def block_done(self) -> None:
        """Give back the block's autograd buffers: otherwise RSS creeps up block after block."""
        release_host_memory()

    @torch.no_grad()
    def restore_held(self) -> None:
        """Every weight held in bfloat16 gets its own dtype back, with the exact fake-quantized values."""
        release_host_memory()
        for module, dtype, qw in self._held:
            replace_weight(module, qw.dequantize().to(dtype))
            release_host_memory()  # the bf16 copy just dropped: keep the heap from holding both
        self._held = []


def _rows(value: Any, batch: int, n: int) -> Any:
    """``value`` with its leading ``batch`` dimension cut to ``n`` rows (tensors, inside tuples and lists too)."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, batch, n) for v in value)
    return value


def compiled_or_eager(fn):
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


def replace_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Give ``module`` a new weight tensor (another dtype: ``copy_`` would keep the old one's)."""
    module.weight = nn.Parameter(value.to(module.weight.device), requires_grad=module.weight.requires_grad)
