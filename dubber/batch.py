"""Batch dubbing: many (face, audio) pairs from two folders or a CSV manifest, failures isolated.

Pairs are matched by file stem. Finished outputs are skipped, so an interrupted batch resumes
where it stopped; one bad item is reported and the others still run.
"""

import csv
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from dubber import media
from dubber.errors import DubberError
from dubber.pipeline import LipsyncOptions, lipsync


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


def _run_one(job: Job, options: LipsyncOptions, threads: int) -> JobResult:
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


def run_batch(jobs: List[Job], options: LipsyncOptions, workers: int = 1,
              on_result: Optional[Callable[[JobResult], None]] = None) -> List[JobResult]:
    """Run jobs (in `workers` processes when > 1); existing outputs are skipped unless options.overwrite."""
    results: List[JobResult] = []
    todo = []
    for job in jobs:
        if job.output.exists() and not options.overwrite:
            result = JobResult(job, "skipped", "output exists")
            results.append(result)
            on_result and on_result(result)
        else:
            todo.append(job)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if workers <= 1:
        for job in todo:
            result = _run_one(job, options, threads)
            results.append(result)
            on_result and on_result(result)
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_one, job, options, threads) for job in todo]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            on_result and on_result(result)
    return results
