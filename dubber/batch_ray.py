"""Batches on Ray: each job of dubber.batch runs as a Ray task, on a Ray started for the run or an
existing cluster.

Ray is an optional extra (`pip install 'dubber[ray]'`). Tasks read the inputs and write the outputs
at the paths the driver planned, so on a cluster these must be on a filesystem that every node mounts
at the same path. Skipping, retries and results are dubber.batch.run_jobs's: Ray itself never
retries a task (max_retries=0), so a worker that dies is one failed attempt like any other, reported
and tried once more.
"""

import dataclasses
import importlib.util
import logging
import math
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Hashable, Iterator, List

from dubber import batch
from dubber.batch import Job, JobResult, ResultHook
from dubber.options import OptionError
from dubber.pipeline import LipsyncOptions

LOCAL = "local"  # start a Ray on this machine for the run (Ray's own name for it)
ADDRESS_RE = re.compile(r"^(local|auto|ray://[^\s/]+|[^\s/:]+:\d{1,5})$")
INSTALL = "pip install 'dubber[ray]'"
# Tasks are sent paths and options, not media: the object store of a Ray started here stays at
# Ray's minimum size instead of its default (30 % of memory).
LOCAL_OBJECT_STORE_BYTES = 80 * 2**20
# A cluster's address is tried first: Ray itself retries an address where nothing answers for minutes.
REACH_SECONDS = 5


def available() -> bool:
    return importlib.util.find_spec("ray") is not None


def check(address: str, cpus: float, gpus: float, device: str, half: bool = False) -> None:
    """The --ray options, before any work: the address, per-task resources, the device and --half
    they imply, Ray itself installed and a cluster's address answering."""
    if not ADDRESS_RE.match(address or ""):
        raise OptionError("--ray", address, "must be local (a Ray started for the run), auto (the cluster this "
                                            "machine belongs to), HOST:PORT or ray://HOST:PORT")
    if not cpus > 0:
        raise OptionError("--ray-cpus", cpus, "must be greater than 0 (CPUs each task reserves)")
    if not gpus >= 0:
        raise OptionError("--ray-gpus", gpus, "must be at least 0 (GPUs each task reserves; 0.5 shares one)")
    if gpus > 0 and device == "cpu":
        raise OptionError("--ray-gpus", gpus, "reserves GPUs that --device cpu would not use")
    if device.startswith("cuda"):
        if gpus == 0:
            raise OptionError("--device", device, "with --ray needs --ray-gpus (a task uses the GPUs it reserves)")
        if device != "cuda":
            raise OptionError("--device", device, "with --ray: a task sees only the GPU Ray gives it; use cuda or auto")
    if half and gpus == 0:
        raise OptionError("--half with --ray-gpus", gpus, "fp16 needs a GPU: reserve one a task (--ray-gpus 1, "
                                                          "or 0.5 to share)")
    if not available():
        raise OptionError("--ray", address, f"needs Ray, which is not installed: {INSTALL}")
    if address not in (LOCAL, "auto"):
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=REACH_SECONDS).close()
        except OSError as exc:
            raise OptionError("--ray", address, f"nothing answers there ({exc.strerror or exc})") from exc


@contextmanager
def connected(address: str = LOCAL) -> Iterator[None]:
    """Connect to Ray at `address` (local: start one here, gone at the end) for the block. A process
    that is already connected (its own ray.init) keeps that connection and it stays open."""
    import ray

    if ray.is_initialized():
        yield
        return
    settings = {}
    if address == LOCAL:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a Ray started on the user's behalf reports nothing
        settings = dict(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OptionError("--ray", address, f"cannot start or reach Ray ({_first_line(exc)})") from exc
    try:
        yield
    finally:
        ray.shutdown()


def run_batch(jobs: List[Job], options: LipsyncOptions, address: str = LOCAL, cpus: float = 1.0,
              gpus: float = 0.0, on_result: ResultHook = None, on_retry: ResultHook = None) -> List[JobResult]:
    """Run jobs as Ray tasks reserving `cpus` CPUs (torch threads: that many, at least 1) and `gpus`
    GPUs each; as many run at once as the cluster's resources allow. Same rules and results as
    dubber.batch.run_batch."""
    import ray

    threads = max(1, math.ceil(cpus))
    # Workers may run elsewhere, in another working directory: they get absolute paths.
    options = dataclasses.replace(options, weights=options.weights and Path(options.weights).absolute())
    if gpus == 0 and options.device == "auto":
        options = dataclasses.replace(options, device="cpu")  # a task without a GPU reserved leaves them alone
    task = ray.remote(batch.run_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)

    def submit(job: Job):
        absolute = Job(job.face.absolute(), job.audio.absolute(), job.output.absolute())
        return task.remote(absolute, options, threads)

    def finished(running: Dict[Hashable, Job]):
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died, its node was lost, ...
                result = JobResult(running[ref], "failed", f"{running[ref].face}: {_describe(exc)}")
            result.job = running[ref]  # as the caller planned it
            yield ref, result

    with connected(address):
        return batch.run_jobs(jobs, options.overwrite, submit, finished, on_result, on_retry)


def _describe(exc: Exception) -> str:
    import ray

    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OutOfMemoryError)):
        return f"its Ray worker died ({type(exc).__name__})"
    return f"Ray task failed ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
