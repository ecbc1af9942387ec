"""Several training processes, one per device, launched by ``torchrun``.

``torchrun --nproc_per_node N train.py ...`` starts N copies of ``train.py`` and tells each
its place through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). ``distributed()`` reads it, joins the process group
(gloo on the CPU, NCCL on CUDA, where process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``),
and gives the training code a ``Distributed``: its rank, the number of processes and the
few collective operations it needs. Without ``torchrun`` (no ``WORLD_SIZE``, or 1) there
is no process group and every operation is the identity, so one process trains exactly
as it always did.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from transformer.config import ConfigError
from transformer.runtime import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes, and their collectives.

    Every collective (``sum``, ``any``, ``broadcast``, ``gather``, ``on_main``) must be
    called by every process, in the same order, or they wait for each other forever.

    Args:
        rank: this process's number, 0 to ``world_size`` - 1; rank 0 is the main one
            (it writes the run directory, the logs and the checkpoints).
        world_size: the number of processes.
        device: this process's device (``cuda:LOCAL_RANK`` on CUDA).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """Whether there are other processes to agree with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> DistributedDataParallel | None:
        """``model`` in DDP, which all-reduces the gradients in the backward pass; None
        for one process. Buffers are constants (the positional table): they are not
        broadcast at every forward pass."""
        if not self.enabled:
            return None
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all processes (one small all-reduce for the list)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on at least one."""
        return self.sum([float(flag)])[0] > 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (picklable values)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result to every process; an exception
        it raises is raised on every process (so none is left waiting)."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number (set by torchrun)") from None


@contextmanager
def distributed(device_name: str) -> Iterator[Distributed]:
    """Join the training processes that ``torchrun`` started, for the duration.

    Args:
        device_name: ``train.device`` ("auto", "cpu", "cuda", ...). On CUDA, process
            ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK`` whatever index the name gives.

    Yields:
        This process's ``Distributed``; ``Distributed(device=...)`` (one process) when
        ``WORLD_SIZE`` is absent or 1. A process group already set up by the caller is
        used as it is, and left for the caller to end.
    """
    device = resolve_device(device_name)
    world_size = _env_int("WORLD_SIZE") or 1
    if world_size == 1:
        yield Distributed(device=device)
        return
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise ConfigError(f"WORLD_SIZE is {world_size} but RANK or LOCAL_RANK is not set: launch with torchrun")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} here): "
                "use at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(rank=rank, world_size=world_size, device=device)
        if owned:
            _wait_for_the_others(device)
    finally:
        if owned:
            dist.destroy_process_group()


def _wait_for_the_others(device: torch.device, seconds: float = 120.0) -> None:
    """Leave together: no process tears down its end of the group while another still works.

    A process that leaves first (rank 0 exits with 130 after a stop, which torchrun
    counts as a failure) while another is still closing its gloo connections can make
    that one abort at exit ("terminate called without an active exception"). The wait
    on the CPU is bounded, so a process whose peer died waits ``seconds`` at most.
    """
    try:
        if device.type == "cpu":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds))
        else:
            dist.barrier()
    except RuntimeError as e:  # a peer that failed already said why; leave anyway
        log.warning("process %d: the others did not reach the end (%s)", dist.get_rank(), e)
