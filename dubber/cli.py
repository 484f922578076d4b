"""The `dubber` command: a thin Typer layer over dubber.pipeline, dubber.batch, dubber.train and dubber.eval.

Logs and progress go to stderr, results to stdout. Expected failures print one line
("error: <file>: <problem>") and exit with 1; nothing half-written is left behind.
"""

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from dubber.errors import DubberError
from dubber.apply import BATCH_FRAMES
from dubber.media import VIDEO_CRF

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a face (photo or video) speak a speech track, lips in sync.")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def _progress(quiet: bool):
    """Yield a ProgressHook drawing rich bars on stderr (or doing nothing when quiet)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_stderr_console(), transient=False) as bar:
        tasks = {}

        def hook(stage: str, advance: int, total: Optional[int]):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], advance=advance)

        yield hook


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_box(text: Optional[str]):
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
        assert len(values) == 4 and values[2] > values[0] and values[3] > values[1]
        return values
    except (ValueError, AssertionError):
        _fail(f"--face-box must be x0,y0,x1,y1 in pixels, got {text!r}")


@app.command()
def lipsync(
    face: Path = typer.Argument(..., help="Photo or video of the face; a folder of them; or a CSV manifest (face,audio,output)."),
    audio: Optional[Path] = typer.Argument(None, help="Speech (any audio ffmpeg reads, or a video's audio); a folder for batches."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .mp4 (or folder for batches)."),
    backbone: Optional[str] = typer.Option(None, help="Generator backbone (default: dck)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint to use instead of the shipped weights."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    half: bool = typer.Option(False, help="fp16 inference (CUDA only)."),
    fps: float = typer.Option(25.0, help="Frame rate for photo input."),
    blend: str = typer.Option("auto", help="auto, feather, poisson or alpha."),
    detector: str = typer.Option("hog", help="Face detector: hog or cnn."),
    face_index: int = typer.Option(0, help="Which face to dub, 0 = largest."),
    face_box: Optional[str] = typer.Option(None, help="Dub the face overlapping this box: x0,y0,x1,y1."),
    batch_size: int = typer.Option(BATCH_FRAMES, help="Frames per backbone call."),
    crf: int = typer.Option(VIDEO_CRF, help="H.264 quality (lower is better, 0-51)."),
    jobs: int = typer.Option(1, help="Parallel jobs for batches."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Dub FACE with AUDIO: `dubber lipsync face.jpg speech.wav -o out.mp4`."""
    from dubber.pipeline import LipsyncOptions

    options = LipsyncOptions(backbone=backbone, weights=weights, device=device, half=half, fps=fps, blend=blend,
                             detector=detector, face_index=face_index, face_box=_parse_box(face_box),
                             batch_size=batch_size, crf=crf, overwrite=overwrite)
    if face.is_dir() or face.suffix.lower() == ".csv":
        _lipsync_batch(face, audio, output, options, jobs, quiet)
        return
    if audio is None:
        _fail("AUDIO is required unless FACE is a folder or a CSV manifest")
    from dubber.pipeline import lipsync as run

    with _progress(quiet) as hook:
        summary = run(face, audio, output, options, hook)
    for note in summary.notes:
        quiet or typer.echo(f"note: {note}", err=True)
    quiet or typer.echo(f"{summary.frames} frames ({summary.faces} dubbed, {summary.passed_through} without a face) "
                        f"in {summary.seconds:.1f} s, {summary.fps:.1f} fps, backbone {summary.backbone} on {summary.device}", err=True)
    typer.echo(str(summary.output))


def _lipsync_batch(face: Path, audio: Optional[Path], output: Path, options, workers: int, quiet: bool):
    from rich.table import Table
    from rich.text import Text

    from dubber import batch

    if face.suffix.lower() == ".csv":
        jobs = batch.plan_from_manifest(face, output)
    else:
        if audio is None:
            _fail("a folder of faces needs AUDIO: a folder (paired by name) or one audio file")
        jobs = batch.plan_from_folders(face, audio, output)
    output.mkdir(parents=True, exist_ok=True)
    console = _stderr_console()
    log = (lambda r: None) if quiet else (lambda r: console.print(f"[{r.status}] {r.job.face.name}: {r.message}",
                                                                   markup=False, highlight=False))
    results = batch.run_batch(jobs, options, workers, log)
    table = Table(title="dubber batch")
    for column in ("face", "audio", "output", "status", "detail"):
        table.add_column(column)
    for r in results:
        # Text, not markup: file names and messages may hold [brackets]
        table.add_row(*(Text(str(v)) for v in (r.job.face.name, r.job.audio.name, r.job.output, r.status, r.message)))
    from rich.console import Console

    Console().print(table)
    failed = sum(r.status == "failed" for r in results)
    if failed:
        _fail(f"{failed} of {len(results)} items failed")


@app.command()
def preprocess(
    inputs: List[Path] = typer.Argument(..., help="Photos or videos (or folders of them)."),
    output: Path = typer.Option(..., "-o", "--output", help="Cache folder: one .npz per input."),
    crop: List[str] = typer.Option([], help="Crops to store, kind:size (face:96, lips:64, box:128). Default: face:96 box:128."),
    detector: str = typer.Option("hog", help="hog or cnn."),
    face_index: int = typer.Option(0, help="Which face, 0 = largest."),
    overwrite: bool = typer.Option(False, help="Replace existing cache files."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Detect, align and crop faces; write boxes, 68 landmarks, transforms, crops and audio features."""
    from dubber import media
    from dubber.analysis import FaceChoice
    from dubber.cache import preprocess as run
    from dubber.face.crops import CropSpec

    specs = []
    for text in crop:
        try:
            specs.append(CropSpec.parse(text))
        except ValueError as exc:
            _fail(f"--crop: {exc}", 2)
    files = [f for path in inputs for f in (media.list_media(path, "face") if path.is_dir() else [path])]
    choice = FaceChoice(detector=detector, face_index=face_index)
    failed = 0
    for path in files:
        try:
            with _progress(quiet) as hook:
                written = run(path, output, specs, choice, hook, overwrite)
            typer.echo(str(written))
        except DubberError as exc:
            failed += 1
            typer.echo(f"error: {exc}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def blend(
    source: Path = typer.Argument(..., help="The original photo or video."),
    cache: Path = typer.Argument(..., help="Its preprocess cache (.npz)."),
    crops: Path = typer.Argument(..., help="Generated crops: a video or a folder of images, one per frame."),
    output: Path = typer.Option(..., "-o", "--output"),
    mode: str = typer.Option("feather", help="feather, poisson or alpha."),
    audio: Optional[Path] = typer.Option(None, help="Audio for the output (default: the source's)."),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Paste generated face crops back into the source frames."""
    from dubber.pipeline import blend_video

    with _progress(quiet) as hook:
        summary = blend_video(source, cache, crops, output, mode, audio, overwrite, progress=hook)
    typer.echo(str(summary.output))


@app.command()
def train(
    backbone: str = typer.Option("dck", help="What to train: a backbone (dck, ...) or syncnet (the lip-sync expert)."),
    data: Path = typer.Option(Path("../shared/data"), help="Corpus root (grid/, wild/, manifest_wild.csv)."),
    cache: Path = typer.Option(Path("cache"), help="Preprocess cache folder (outside version control)."),
    out: Optional[Path] = typer.Option(None, help="Model file to write (default: runs/<name>-<date>/<name>.pt)."),
    force: bool = typer.Option(False, help="Allow --out to name a shipped file in weights/."),
    steps: int = typer.Option(20000, help="Total optimiser steps (a resumed run continues to this count)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: the recipe's)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    grid_every: int = typer.Option(3, help="Use every n-th GRID training sentence."),
    sync_expert: Optional[Path] = typer.Option(None, help="A trained syncnet file to add a lip-sync loss (dck)."),
    resume: bool = typer.Option(True, help="Continue from the training checkpoint beside OUT."),
    val_every: int = typer.Option(0, help="Validate on held-out identities every N steps (0: never)."),
    patience: int = typer.Option(0, help="Stop after N validations without improvement (0: never)."),
    log_every: int = typer.Option(50, help="Log mean losses every N steps."),
    checkpoint_every: int = typer.Option(500, help="Write the resumable training state every N steps."),
    workers: int = typer.Option(2, help="Processes building the preprocess cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train a backbone or the sync expert from scratch on the corpus; checkpoints and resumes."""
    import datetime

    from dubber.backbones import WEIGHTS_DIR
    from dubber.train import train_from_corpus

    for option, value in (("--steps", steps), ("--grid-every", grid_every), ("--log-every", log_every),
                          ("--checkpoint-every", checkpoint_every), ("--workers", workers)):
        if value < 1:
            _fail(f"{option} must be at least 1, got {value}", 2)
    if out is None:
        out = Path("runs") / f"{backbone}-{datetime.datetime.now():%Y%m%d-%H%M%S}" / f"{backbone}.pt"
    if out.exists() and out.is_dir():
        _fail(f"--out {out}: is a directory; name the model file to write", 2)
    if out.resolve().parent == WEIGHTS_DIR.resolve() and not force:
        _fail(f"--out {out}: would replace a shipped file in weights/; add --force to do that", 2)
    log = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
    with _progress(quiet) as hook:
        written = train_from_corpus(backbone, data, cache, out, steps, batch_size, device, grid_every, resume,
                                    sync_expert, val_every, patience, log_every, checkpoint_every, workers,
                                    log=log, progress=hook)
    typer.echo(str(written))


@app.command(name="eval")
def evaluate(
    dataset: str = typer.Option(..., help="grid, lrw or folder."),
    root: Path = typer.Option(..., help="Dataset root (grid: <root>/<speaker>/<utt>.mpg|mp4)."),
    backbone: List[str] = typer.Option([], help="Backbones to score (repeatable); baselines are always scored."),
    split: Optional[Path] = typer.Option(None, help="List of clips (one path per line) or a CSV with file,split (val rows)."),
    limit: Optional[int] = typer.Option(None, help="At most this many clips."),
    mode: str = typer.Option("video", help="video (generate from the clip's frames) or photo (from its first frame)."),
    dub: bool = typer.Option(False, help="Also drive each clip with the next clip's speech."),
    out: Path = typer.Option(Path("eval-out"), help="Folder for clips.csv, summary.json and sheets/."),
    sync_expert: Optional[Path] = typer.Option(None, help="SyncNet weights (default: weights/syncnet.pt)."),
    no_sync_expert: bool = typer.Option(False, help="Skip LSE-D/LSE-C (model-free sync only)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Score backbones against ground truth, static-frame and shifted-audio baselines."""
    from rich.console import Console
    from rich.table import Table

    from dubber.eval import run

    clips = run.list_clips(dataset, root, split, limit)
    expert = None if no_sync_expert else run.load_sync_expert(sync_expert)
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with _progress(quiet) as hook:
        step = (lambda k: hook("evaluate", 1, len(clips))) if hook else None
        summary = run.evaluate(clips, out, backbone, mode, expert, device, dub, log=log, on_clip=step)
    table = Table(title=f"dubber eval: {dataset}, {len(clips)} clips, {mode} mode",
                  caption=run.TABLE_NOTE if expert is not None else None)
    shown = [c for c in run.COLUMNS if any(c in s for s in summary.values())]
    table.add_column("system")
    for column in shown:
        table.add_column(column, justify="right")
    for system, values in summary.items():
        table.add_row(system, *[f"{values[c]:.3f}" if c in values else "" for c in shown])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    typer.echo(str(out))


@app.command()
def backbones():
    """List backbones and whether trained weights are present."""
    from dubber.backbones import PLANNED, models, weights_path

    registry = models()
    for name in sorted(set(PLANNED) | set(registry)):
        if name not in registry:
            typer.echo(f"{name:10s} not implemented")
            continue
        cls = registry[name]
        shape = (f"window {cls.window}, overlap {cls.overlap}, {'stateful' if cls.stateful else 'stateless'}, "
                 f"{cls.crop}, identity: {cls.conditioning}") if hasattr(cls, "window") else "sync expert"
        weights = weights_path(name)
        state = (f"weights: {weights}" if weights.is_file() else
                 "no weights needed" if not getattr(cls, "needs_weights", True) else "no trained weights")
        typer.echo(f"{name:10s} {state}  ({shape})")


def main():
    """Console entry point: one-line errors instead of tracebacks for expected failures."""
    try:
        app()
    except DubberError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("DUBBER_DEBUG"):
            raise
        typer.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with DUBBER_DEBUG=1 for details", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
