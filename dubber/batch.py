"""Batch dubbing: many (face, audio) pairs from two folders or a CSV manifest, failures isolated.

Pairs are matched by file stem. Finished outputs are skipped, so an interrupted batch resumes
where it stopped; one bad item is reported and the others still run. A failed item runs once
more before it is reported as failed. The jobs run here (one process, or a pool of them) or as
Ray tasks (dubber.batch_ray); both go through the same skip and retry rules (`run_jobs`).
"""

import csv
import dataclasses
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Tuple

from dubber import media
from dubber.errors import DubberError
from dubber.pipeline import LipsyncOptions, lipsync

# A failed item runs once more: its worker may have died for reasons outside the item (memory, a
# lost node) or a shared filesystem may have lagged; an item failing twice is reported.
RETRIES = 1


@dataclass
class Job:
    face: Path
    audio: Path
    output: Path


@dataclass
class JobResult:
    job: Job
    status: str  # "done", "skipped", "failed"
    message: str = ""
    seconds: float = 0.0
    attempts: int = 0  # runs it took (0: skipped)


ResultHook = Optional[Callable[[JobResult], None]]


def plan_from_folders(faces: Path, audios: Path, out_dir: Path) -> List[Job]:
    """Pair files of two folders by stem (an audio file may also be one file for every face)."""
    face_files = media.list_media(faces, "face")
    if audios.is_dir():
        by_stem = {p.stem: p for p in media.list_media(audios, "audio")}
        jobs = [Job(f, by_stem[f.stem], out_dir / f"{f.stem}.mp4") for f in face_files if f.stem in by_stem]
        if not jobs:
            raise DubberError("no face file has an audio file of the same name", audios)
        return jobs
    return [Job(f, audios, out_dir / f"{f.stem}.mp4") for f in face_files]


def plan_from_manifest(manifest: Path, out_dir: Optional[Path]) -> List[Job]:
    """Jobs from a CSV with columns face,audio,output (relative paths are relative to the CSV)."""
    base = manifest.parent
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"face", "audio"} <= set(reader.fieldnames):
            raise DubberError("manifest needs a header with columns face,audio[,output]", manifest)
        jobs = []
        for row in reader:
            face = base / row["face"].strip()
            output = (row.get("output") or "").strip() or f"{face.stem}.mp4"
            output_path = Path(output) if Path(output).is_absolute() else (out_dir or base) / output
            jobs.append(Job(face, base / row["audio"].strip(), output_path))
    if not jobs:
        raise DubberError("manifest lists no jobs", manifest)
    return jobs


def run_one(job: Job, options: LipsyncOptions, threads: int) -> JobResult:
    """Dub one job with `threads` torch threads; any failure becomes a "failed" result."""
    import torch

    torch.set_num_threads(threads)
    if options.fps is not None and job.face.suffix.lower() not in media.IMAGE_EXTENSIONS:
        options = dataclasses.replace(options, fps=None)  # --fps is for the photos; a video keeps its own rate
    try:
        summary = lipsync(job.face, job.audio, job.output, options)
        return JobResult(job, "done", f"{summary.frames} frames, {summary.passed_through} without face", summary.seconds)
    except DubberError as exc:
        return JobResult(job, "failed", str(exc))
    except Exception as exc:  # one broken item must not stop the batch
        return JobResult(job, "failed", f"{job.face}: unexpected {type(exc).__name__}: {exc}")


def run_jobs(jobs: List[Job], overwrite: bool, submit: Callable[[Job], Hashable],
             finished: Callable[[Dict[Hashable, Job]], Iterable[Tuple[Hashable, JobResult]]],
             on_result: ResultHook = None, on_retry: ResultHook = None) -> List[JobResult]:
    """The rules every runner shares: existing outputs are skipped (unless `overwrite`), temporaries a
    killed run left are removed before a job (re)starts and once more when the batch ends, and a
    failed job runs once more (RETRIES).

    submit(job) starts a job and returns a handle; finished({handle: job} of those running) blocks
    until at least one is done and yields (handle, JobResult) for them. on_result gets each final
    result as it comes (skipped ones first), on_retry each failure that is tried again; the list
    returned is in the order of `jobs`.
    """
    results: Dict[int, JobResult] = {}
    todo = []
    for index, job in enumerate(jobs):
        if job.output.exists() and not overwrite:
            results[index] = JobResult(job, "skipped", "output exists")
            on_result and on_result(results[index])
        else:
            todo.append((index, job))
    media.remove_partials(job.output for _, job in todo)  # left by an interrupted earlier run
    running: Dict[Hashable, Job] = {}
    tries: Dict[Hashable, Tuple[int, int]] = {}  # handle -> (index in jobs, attempt)
    failed_once: List[Path] = []
    for index, job in todo:
        handle = submit(job)
        running[handle], tries[handle] = job, (index, 1)
    while running:
        for handle, result in list(finished(dict(running))):
            job, (index, attempt) = running.pop(handle), tries.pop(handle)
            result.attempts = attempt
            if result.status == "failed":
                media.remove_partials([job.output])  # a worker that died mid-write could not
                failed_once.append(job.output)
            if result.status == "failed" and attempt <= RETRIES:
                on_retry and on_retry(result)
                handle = submit(job)
                running[handle], tries[handle] = job, (index, attempt + 1)
            else:
                results[index] = result
                on_result and on_result(result)
    # Again at the end: the encoder of a worker that died outlives it, reads the end of its input and
    # writes the temporary it had begun, possibly after the removal above (seen on a loaded machine).
    media.remove_partials(failed_once)
    return [results[index] for index in range(len(jobs))]


def run_batch(jobs: List[Job], options: LipsyncOptions, workers: int = 1, on_result: ResultHook = None,
              on_retry: ResultHook = None) -> List[JobResult]:
    """Run jobs here, in `workers` processes when > 1 (see run_jobs for the rules)."""
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if workers <= 1:
        def submit(job: Job):
            return object()  # run when finished() asks, so results arrive one by one

        def finished(running: Dict[Hashable, Job]):
            handle, job = next(iter(running.items()))
            yield handle, run_one(job, options, threads)

        return run_jobs(jobs, options.overwrite, submit, finished, on_result, on_retry)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        def submit(job: Job):
            return pool.submit(run_one, job, options, threads)

        def finished(running: Dict[Hashable, Job]):
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            return [(future, future.result()) for future in done]

        return run_jobs(jobs, options.overwrite, submit, finished, on_result, on_retry)
