"""More than one process (``torchrun --nproc_per_node N -m autoround ...``): data-parallel calibration.

The calibration samples are split across the ranks (rank r holds samples r, r + N, r + 2N, ...); every rank
runs the same block on its share.  SignRound's batches are drawn from the global sample indices with the same
seed on every rank, each rank computes its part of a batch's loss (normalized by the whole batch's count), and
the gradients and the loss are summed over the ranks before the step, so every rank takes the same step as one
process would; optimized RTN's importance sums and counts and the static activation amax are reduced the same
way.  Rank 0 alone writes the checkpoint (and the resume store, whose finished blocks it broadcasts to the
others).  Gloo on CPU, NCCL on CUDA.

``Group`` is the run's view of the process group (``SINGLE`` when there is one process: every collective is a
no-op); ``Shard`` maps global sample indices to the rows a rank holds.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .. import envs
from ..log import logger
from .errors import AutoRoundError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """``world_size`` processes, this one ``rank``; the collectives turn a peer's failure into one
    ``AutoRoundError``."""

    world_size: int = 1
    rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except AutoRoundError:
            raise
        except Exception as exc:  # gloo / NCCL errors: a peer died or timed out
            reason = " ".join(str(exc).split())[:300]
            raise AutoRoundError(
                f"torch.distributed rank {self.rank} of {self.world_size}: {what} failed ({type(exc).__name__}: "
                f"{reason}); another rank stopped or did not answer within AR_DIST_TIMEOUT={envs.AR_DIST_TIMEOUT:g}s. "
                "Nothing was written; fix that rank's error (its log) and run again"
            ) from exc

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (one flat message per dtype and device)."""
        if not self.active or not tensors:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        with self._collective("summing gradients and statistics"):
            for ts in groups.values():
                flat = _flatten_dense_tensors(ts)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                    t.copy_(v)

    def max_(self, tensors: Sequence[torch.Tensor]) -> None:
        if not self.active or not tensors:
            return
        import torch.distributed as dist

        with self._collective("taking the maximum of activation ranges"):
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order."""
        if not self.active:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self._collective("gathering the largest errors"):
            dist.all_gather(out, t)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        with self._collective("receiving rank 0's data"):
            dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Group()


@dataclass(frozen=True)
class Shard:
    """The rows of ``n`` global samples that rank ``group.rank`` holds: global index i lives on rank
    i % world_size, at local row i // world_size."""

    group: Group
    n: int

    def rows(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global ``[n, ...]`` tensor."""
        return data[self.group.rank :: self.group.world_size]

    def owned(self, idx: torch.Tensor) -> torch.Tensor:
        """The global indices of ``idx`` this rank holds."""
        return idx[idx % self.group.world_size == self.group.rank]

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """The local rows of the global indices ``idx`` (all held by this rank)."""
        return idx // self.group.world_size


def current() -> Group:
    """The process group this run belongs to: ``SINGLE`` without a launcher; under torchrun (WORLD_SIZE > 1)
    the default group, initialized here when the caller has not (gloo on CPU, NCCL where CUDA is available).
    A partial launcher environment is one clear error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_world_size(), dist.get_rank())
    world = envs.WORLD_SIZE
    if world is None or world == 1:
        return SINGLE
    if not dist.is_available():
        raise AutoRoundError(f"WORLD_SIZE={world}: this torch build has no torch.distributed; run one process")
    missing = [v for v in LAUNCHER_VARS if not envs.is_set(v)]
    if missing:
        raise AutoRoundError(
            f"WORLD_SIZE={world} asks for {world} processes but the launcher's {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the run with torchrun "
            f"(torchrun --nproc_per_node {world} -m autoround ...), or unset WORLD_SIZE for one process"
        )
    rank = envs.RANK
    if rank >= world:
        raise AutoRoundError(f"RANK={rank} is not below WORLD_SIZE={world}: the launcher's environment is wrong")
    # CUDA tensors (gradients of a block tuned on a GPU) through NCCL, CPU tensors (statistics) through gloo
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        if backend != "gloo":
            torch.cuda.set_device(envs.LOCAL_RANK or 0)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=envs.AR_DIST_TIMEOUT))
    except Exception as exc:
        raise AutoRoundError(
            f"torch.distributed: rank {rank} of {world} could not join the group at "
            f"{envs.MASTER_ADDR}:{envs.MASTER_PORT} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from exc
    logger.info("torch.distributed: rank %d of %d (%s); the calibration samples are split across the ranks",
                rank, world, backend)
    return Group(world, rank)


@contextlib.contextmanager
def terminate_as_error(group: Group) -> Iterator[None]:
    """While a distributed run works, the launcher's SIGTERM (sent when another rank failed) raises an
    ``AutoRoundError`` in this process, so its scratch files are removed on the way out."""
    if not group.active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise AutoRoundError(f"torch.distributed rank {group.rank}: stopped by the launcher (signal {signum}; "
                             "another rank failed); nothing was written")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
