"""Data-parallel training over `torch.distributed`, as `torchrun` launches it.

Every rank reads only its own streams of the shuffled data, its equal, contiguous slice of
each global batch (the global batches are those of one process reading as many streams:
`reader.shuffled_batches`), and trains on it; after
each backward pass the gradients are averaged over the ranks, so every rank takes the same
optimiser step with the gradient of the mean loss over the global batch (equal slices make
the mean of the ranks' means the global mean). The averaging runs as DistributedDataParallel
does it, in a callback queued on the autograd engine at the end of `backward()`: a caller
that clips or steps right after backward (sae-lens's `SAETrainer._train_step` does both
inside one call) sees the global gradient, and the closed-form RQAE step, whose backward
hands out precomputed gradients (`models/rqae_closed_form.py`), needs nothing special.
DDP itself cannot be used: it hooks `forward()`, which sae-lens's trainer never calls.

Backends: gloo on CPU (one torch thread per rank: torchrun sets OMP_NUM_THREADS=1), NCCL
on GPUs (rank r uses cuda:LOCAL_RANK). A single process (no torchrun) is world size 1 and
touches none of this.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rqae_pipeline import RQAEError
from rqae_pipeline.io import default_device


@dataclass(frozen=True, kw_only=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def ranks_from_env() -> Ranks:
    """The ranks torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def start(device: str | None) -> tuple[Ranks, str]:
    """Join the process group torchrun set up (if any); the ranks and this rank's device."""
    ranks = ranks_from_env()
    device = device or default_device()
    if not ranks.distributed:
        return ranks, device
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(device)
    _die_with_launcher()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")  # env:// from torchrun
    if not on_gpu:
        bind_to_own_cores(ranks)  # after the group: gloo's own threads stay unbound
    return ranks, device


def bind_to_own_cores(ranks: Ranks) -> set[int] | None:
    """Bind this thread, and the threads it starts from now on (the reader's, zarr's), to this
    CPU rank's own equal share of the cores the job may use (local rank i: the i-th share),
    as torchrun's `--numa-binding=exclusive` does for GPU ranks. Unbound, the OS runs a
    rank's reader thread on the core of another rank's step, which the rank then waits for
    in the gradient all_reduce (docs/benchmarks.md). Threads already running (gloo's) stay
    unbound: binding them too made a rank abort at exit ("terminate called without an
    active exception") in about 1 of 6 short runs. To keep two jobs on one machine apart,
    start each with its own cores (`taskset`): each splits what it is given. The share, or
    None where there is nothing to split (Linux only)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // local
    if share < 1:
        return None
    mine = set(cpus[ranks.local_rank * share : (ranks.local_rank + 1) * share])
    os.sched_setaffinity(0, mine)  # this thread; those it starts from now on (the reader's, zarr's) inherit it
    return mine


def _die_with_launcher() -> None:
    """torchrun starts each rank in its own session, so a kill -9 of torchrun would leave the
    ranks training on, writing checkpoints under a run being resumed. On Linux the kernel
    then kills them too (PR_SET_PDEATHSIG); a launcher already gone means exit now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if parent == 1 or os.getppid() != parent:  # orphaned before or while the request was made
        os._exit(1)


def stop(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, ranks: Ranks) -> None:
    if batch_size % ranks.world_size:
        raise RQAEError(f"--batch-size {batch_size} does not split evenly over {ranks.world_size} processes; "
                        f"use a multiple of {ranks.world_size}")


def next_on_every_rank(batches: Iterator, ranks: Ranks):
    """next(batches), or on every rank the error a rank's reader raised: ranks read disjoint
    streams, so only the rank holding a damaged row sees it, and the others must not be left
    waiting for it in the gradient all_reduce. One flag all_reduce per step, on the CPU (a gloo
    group beside NCCL), so the step does not wait for the device."""
    if not ranks.distributed:
        return next(batches)
    try:
        item, error = next(batches), ""
    except RQAEError as e:
        item, error = None, str(e)
    group = _cpu_group()
    failed = torch.tensor([1 if error else 0])
    dist.all_reduce(failed, group=group)
    if failed.item():
        errors = [None] * ranks.world_size
        dist.all_gather_object(errors, error, group=group)
        raise RQAEError(next(e for e in errors if e))
    return item


def on_main(fn, ranks: Ranks):
    """fn() on the main rank (None on the others); an RQAEError it raises is raised on every
    rank, so no rank goes on to wait in a collective for a main rank that has stopped."""
    result, error = None, ""
    if ranks.is_main:
        try:
            result = fn()
        except RQAEError as e:
            error = str(e)
    if ranks.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        error = box[0]
    if error:
        raise RQAEError(error)
    return result


_gloo_beside_nccl = None


def _cpu_group():
    """The group for small CPU collectives: the default one under gloo, a gloo group under NCCL."""
    global _gloo_beside_nccl
    if dist.get_backend() == "gloo":
        return None
    if _gloo_beside_nccl is None:  # made on every rank at the same (first) call: a collective
        _gloo_beside_nccl = dist.new_group(backend="gloo")
    return _gloo_beside_nccl


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


class GradientAverager:
    """At the end of every backward pass, replace the parameters' gradients by their mean
    over the ranks: one all_reduce of the gradients flattened into one buffer (a parameter
    without a gradient this step counts as zeros, so every rank reduces the same tensor)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], world_size: int):
        self.params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        self._queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, _param) -> None:
        if not self._queued:  # the first parameter done in this backward pass queues the reduction
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    @torch.no_grad()
    def _average(self) -> None:
        self._queued = False
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat.div_(self.world_size)
        offset = 0
        for p in self.params:
            part = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
            offset += p.numel()


def average_gradients(module: torch.nn.Module, ranks: Ranks) -> GradientAverager | None:
    return GradientAverager(module.parameters(), ranks.world_size) if ranks.distributed else None


def broadcast_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's floating-point buffers on every rank (BatchTopK's running threshold is
    estimated from each rank's own slice; the ranks must keep one model)."""
    if ranks.distributed:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.broadcast(buf, 0)


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.distributed:
        dist.all_reduce(t)
    return t


def mean_over_ranks(stats: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, float]:
    """A step's 0-d metric tensors as floats: their mean over the ranks (one all_reduce, one
    host sync). Means over equal slices average to the global batch's mean (the loss); a
    ratio such as the batch FVU becomes the mean of the slices' ratios (docs/training.md)."""
    if not stats:
        return {}
    device = next(iter(stats.values())).device
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in stats.values()])
    if ranks.distributed:
        dist.all_reduce(values)
        values /= ranks.world_size
    return dict(zip(stats, values.tolist()))
