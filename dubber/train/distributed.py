"""Training on several processes: `torchrun --nproc-per-node N -m dubber train ...` runs the one
loop (dubber.train.loop) in N processes with DistributedDataParallel -- gloo between CPU
processes, NCCL between GPUs (process k of a machine on its GPU k).

How the work is split, so that N processes at batch B train as one process at batch N*B (equal up
to float summation order, except for BatchNorm, below):

- every process draws the step's whole batch of N*B samples with the loop's per-step rng (seeded
  alike in every process) and keeps its own B rows (`shard`): the sampler's draws and the
  augmentation are those of one process at N*B, whatever N is. Building a batch is numpy and
  pointwise tensor work, small next to the model's forward and backward.
- each module a recipe trains is wrapped in DistributedDataParallel (`wrap`), which averages its
  gradients over the processes during backward: the mean over processes of the gradients of the
  B-row mean losses is the gradient of the N*B-row mean loss. A discriminator is a module like
  any other: each optimiser steps on gradients averaged over the processes.
- BatchNorm normalises each process's B rows (no SyncBatchNorm: it runs on GPUs only and adds a
  collective per layer), and its running statistics are process 0's (DDP broadcasts buffers).
- process 0 alone logs, validates, writes checkpoints and the shipped file. What stops a run (the
  validation patience, the time budget) is process 0's decision, broadcast (`main_decides`), so
  every process stops after the same step; the others wait while it writes the shipped file, and
  all leave the group together (`leave`).
- a checkpoint holds the modules and optimisers unwrapped, as one process writes them, and the
  step's batch N*B: a run resumes on any number N' of processes with batch_size N*B/N' (the loop
  refuses another step's batch, as it refuses other hyperparameters).

The processes must see the same files (one machine, or a shared filesystem): process 0 builds the
preprocess cache while the others wait, and all of them read the checkpoint to resume from.
"""

import atexit
import datetime
import os
from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from dubber.errors import DubberError

# How long the other processes wait for process 0 to finish work they need (building the preprocess
# cache of a whole corpus takes hours on a few cores); collectives of the training steps keep
# torch's default timeout.
MAIN_WAIT = datetime.timedelta(hours=24)

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Process 0 of a torchrun launch, or the only process; true before the group is joined too."""
    return int(os.environ.get("RANK", "0")) == 0


def main_only(log: Callable[[str], None], progress: Optional[Callable]) -> Tuple[Callable, Optional[Callable]]:
    """(log, progress) in process 0, no-ops in the others: a run is reported once."""
    return (log, progress) if is_main() else ((lambda message: None), None)


def world_size() -> int:
    """Processes training together (1 until `join`)."""
    return dist.get_world_size() if _joined() else 1


def rank() -> int:
    return dist.get_rank() if _joined() else 0


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group once (a no-op on one process, or when joined already) and
    return this process's device: cuda -> cuda:LOCAL_RANK; cpu stays cpu. The group is left at
    exit."""
    if launched_processes() <= 1 or _joined():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise DubberError(f"--device {device} picks one GPU, but each of the {launched_processes()} processes "
                              "takes the GPU of its local rank: pass --device cuda (or auto)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_abandon)  # a run that fails leaves the group at exit, without waiting for the others
    return device


def leave() -> None:
    """Leave the process group together, once a process is done with it: wait until every process
    has come here, then close it. A process that closed its end while another still used it aborted
    at exit (gloo's threads, at interpreter shutdown). The group cannot be joined again after."""
    if _joined():
        dist.barrier()
        _abandon()


def _abandon() -> None:
    if _joined():
        dist.destroy_process_group()


def run_on_main(work: Callable[[], T]) -> Optional[T]:
    """work() in process 0 alone while the others wait (up to MAIN_WAIT) for it to finish, e.g. to
    build files they then read. Returns its result in process 0, None in the others."""
    if world_size() == 1:
        return work()
    # A group of its own: the default group's timeout is meant for training steps, not hours.
    waiting = dist.new_group(backend="gloo", timeout=MAIN_WAIT)
    result = work() if is_main() else None
    dist.barrier(group=waiting)
    dist.destroy_process_group(waiting)
    return result


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` in DistributedDataParallel when several processes train and it has trainable
    parameters; else `module` itself. DDP averages the gradients of what runs through forward()."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shard(rows: T) -> T:
    """This process's rows of a batch every process built alike: [N*B, ...] -> rows [k*B, (k+1)*B)
    for process k (a tensor or array; itself on one process)."""
    world = world_size()
    if world == 1:
        return rows
    if len(rows) % world:
        raise ValueError(f"a batch of {len(rows)} rows does not split over {world} processes")
    size = len(rows) // world
    return rows[rank() * size:(rank() + 1) * size]


def mean(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Each value averaged over the processes (every process passes the same keys)."""
    world = world_size()
    if world == 1 or not values:
        return values
    summed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return {key: value / world for key, value in zip(values, summed.tolist())}


def main_decides(flag: bool, device: torch.device) -> bool:
    """Process 0's `flag` in every process: a decision all must take at the same step."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, 0)
    return bool(value.item())


def check_same(value: int, what: str, device: torch.device) -> None:
    """DubberError in every process unless all of them hold the same integer `value`."""
    if world_size() == 1:
        return
    bounds = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    highest, lowest = int(bounds[0]), -int(bounds[1])
    if highest != lowest:
        raise DubberError(f"the processes disagree on the {what} ({lowest} to {highest}): every process must "
                          "read the same files (one machine, or a shared filesystem)")
