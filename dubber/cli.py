"""The `dubber` command: a thin Typer layer over dubber.pipeline, dubber.batch, dubber.train and dubber.eval.

Logs and progress go to stderr, results to stdout. Every option is checked before any work
(dubber.options). Failures print one line, `error: ...`, and exit with 2 for a usage error (an
option or argument value that is not allowed: the line names it, the value and what is
allowed), 1 for an input error (a missing, corrupt or faceless file, a failed batch item), 3 for
an internal error (a bug: rerun with DUBBER_DEBUG=1 for the traceback) and 130 when interrupted;
nothing half-written is left behind.
"""

import atexit
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from dubber import options as check
from dubber.errors import DubberError
from dubber.apply import BATCH_FRAMES
from dubber.media import VIDEO_CRF, VIDEO_PRESET
from dubber.train.adapt import DEFAULT_BACKBONE as ADAPT_BACKBONE
from dubber.train.adapt import DEFAULT_MINUTES as ADAPT_MINUTES
from dubber.train.adapt import DEFAULT_STEPS

EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
_STEPS_NOTE = ", ".join(f"{steps} for {name}" for name, steps in DEFAULT_STEPS.items())  # adaptation's defaults

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a face (photo or video) speak a speech track, lips in sync.")


def _show_version(value: bool):
    if value:
        from dubber import __version__

        typer.echo(f"dubber {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", "-V", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Make a face (photo or video) speak a speech track, lips in sync.

    Shell completion: `dubber --install-completion` (bash, zsh, fish, PowerShell)."""


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def _progress(quiet: bool):
    """Yield a ProgressHook drawing rich bars on stderr (or None when quiet). The bars start on the
    first report, so a command that fails before any work prints nothing but its error."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = None
    tasks = {}

    def hook(stage: str, advance: int, total: Optional[int]):
        nonlocal bar
        if bar is None:
            bar = Progress(*columns, console=_stderr_console(), transient=False)
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], advance=advance)

    try:
        yield hook
    finally:
        if bar is not None:
            bar.stop()


def _fail(message: str, code: int = EXIT_INPUT):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def lipsync(
    face: Path = typer.Argument(..., help="Photo or video of the face; a folder of them; or a CSV manifest (face,audio,output)."),
    audio: Optional[Path] = typer.Argument(None, help="Speech (any audio ffmpeg reads, or a video's audio); a folder for batches."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .mp4 (or folder for batches)."),
    backbone: Optional[str] = typer.Option(None, help="Generator backbone (default: rewrite for a video, dck for a photo "
                                                      "or a --weights file's own; `dubber backbones` lists them)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint to use instead of the shipped weights."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    half: bool = typer.Option(False, help="fp16 inference (CUDA only; with auto on a CPU: fp32 and a note)."),
    precision: str = typer.Option("auto", help="The model's arithmetic: auto (bf16 on a CPU with bf16 units, "
                                               "Intel AMX: twice as fast; fp32 elsewhere), fp32 or bf16."),
    fps: Optional[float] = typer.Option(None, help="Frame rate for photo input (default 25); a video keeps its own."),
    blend: str = typer.Option("auto", help="auto, feather, poisson or alpha."),
    detector: str = typer.Option("hog", help="Face detector: hog or cnn."),
    face_index: int = typer.Option(0, help="Which face to dub, 0 = largest (see `dubber faces`)."),
    face_box: Optional[str] = typer.Option(None, help="Dub the face overlapping this box: x0,y0,x1,y1."),
    face_id: List[str] = typer.Option([], "--face", help="Dub the face with this id in `dubber faces FACE`; "
                                      "repeat as ID=AUDIO to dub several people, each with their own speech."),
    batch_size: int = typer.Option(BATCH_FRAMES, help="Frames per backbone call (1-4096)."),
    crf: int = typer.Option(VIDEO_CRF, help="H.264 quality (0-51, lower is better)."),
    preset: str = typer.Option(VIDEO_PRESET, help="x264 preset: ultrafast (default, fastest) ... veryslow "
                                                  "(smaller files at the same --crf, slower)."),
    start: float = typer.Option(0.0, help="Use a FACE video from this second on (like ffmpeg's -ss)."),
    duration: Optional[float] = typer.Option(None, help="Use this many seconds of a FACE video (like ffmpeg's -t)."),
    loop: str = typer.Option("pingpong", help="Speech longer than the video: pingpong (forward and back), "
                                              "repeat (from the start again), hold (last frame) or stretch (slow it)."),
    pads: Tuple[int, int, int, int] = typer.Option((0, 0, 0, 0), help="Grow the pasted mouth region by top bottom "
                                                   "left right pixels, negative shrinks (Wav2Lip's --pads)."),
    smooth: bool = typer.Option(True, help="Smooth the face alignment over time (--no-smooth: per-frame, as detected)."),
    reuse_analysis: bool = typer.Option(True, help="Keep each FACE's face analysis (by its content, in "
                                                   "~/.cache/dubber or $DUBBER_CACHE_DIR) and reuse it: a second dub "
                                                   "of a video skips detection."),
    jobs: int = typer.Option(1, help="Parallel jobs for batches (1-64)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="local|auto|ADDRESS",
                                      help="Run a batch's jobs as Ray tasks: local (a Ray started for the run), "
                                           "auto (the cluster this machine is in) or HOST:PORT / ray://HOST:PORT."),
    ray_cpus: Optional[float] = typer.Option(None, help="CPUs each --ray task reserves (default 1)."),
    ray_gpus: Optional[float] = typer.Option(None, help="GPUs each --ray task reserves (default 0; 0.5 shares one)."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (batches: one "
                                                           "object per item)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    adapt: bool = typer.Option(False, "--adapt", help="First adapt the backbone to the FACE video (its frames and "
                                                      "own speech; see `dubber adapt`), then dub with it."),
    adapt_steps: Optional[int] = typer.Option(None, help="Optimiser steps of --adapt (default: the backbone's: "
                                                         f"{_STEPS_NOTE})."),
    adapt_minutes: Optional[float] = typer.Option(None, help="Stop --adapt after this many minutes in all "
                                                             f"(default {ADAPT_MINUTES:g})."),
    adapt_out: Optional[Path] = typer.Option(None, help="Keep the --adapt model in this .pt file (default: a "
                                                        "temporary file; a rerun continues from its checkpoint)."),
    mouth_bank: Optional[bool] = typer.Option(None, "--mouth-bank/--no-mouth-bank", help="Replace the generated "
                                              "lips with the closest real ones of FACE (a video's own mouths, by "
                                              "shape; a photo's one mouth, warped). Default: on for a photo, off "
                                              "for a video."),
    mouth_bank_source: Optional[Path] = typer.Option(None, help="Take the --mouth-bank's mouths from this video of "
                                                                "the person instead (implies --mouth-bank)."),
):
    """Dub FACE with AUDIO: `dubber lipsync face.jpg speech.wav -o out.mp4`.

    Several people, one pass: `dubber lipsync interview.mp4 [MIX] -o out.mp4 --face 0=host.wav --face
    1=guest.wav` (ids from `dubber faces`); the output's sound is MIX, or the speech tracks mixed."""
    from dubber.pipeline import LipsyncOptions

    chosen, voices = _parse_faces(face_id)
    options = LipsyncOptions(backbone=backbone, weights=weights, device=device, half=half, precision=precision,
                             fps=fps, blend=blend,
                             detector=detector, face_index=face_index, voices=voices,
                             face_box=check.face_box("--face-box", face_box), face=chosen, batch_size=batch_size,
                             crf=crf, overwrite=overwrite, start=start, duration=duration, loop=loop, pads=pads,
                             smooth=smooth, reuse_analysis=reuse_analysis, preset=preset, mouth_bank=mouth_bank,
                             mouth_bank_source=mouth_bank_source)
    notes = options.check()
    _check_lipsync_adapt(adapt, adapt_steps, adapt_minutes, adapt_out, options)
    is_batch = face.is_dir() or face.suffix.lower() == ".csv"
    on_ray = _check_lipsync_ray(ray, ray_cpus, ray_gpus, jobs, is_batch, options)
    if is_batch:
        if voices:
            raise check.OptionError("--face", face_id[0], "ID=AUDIO dubs the people of one video; FACE is a batch")
        if adapt:
            raise check.OptionError("--adapt", face, "adapts to one video; FACE is a batch")
        check.number("--jobs", jobs, 1, 64, what="parallel jobs")
        _lipsync_batch(face, audio, output, options, jobs, quiet, notes, json_output, on_ray)
        return
    if audio is None and not voices:
        _fail("AUDIO is required unless FACE is a folder or a CSV manifest, or each face has its speech "
              "(--face ID=AUDIO) (usage: dubber lipsync FACE AUDIO -o OUT.mp4)", EXIT_USAGE)
    from dubber.pipeline import lipsync as run

    with _progress(quiet) as hook, _adapted(adapt, face, audio, output, options, adapt_steps, adapt_minutes,
                                            adapt_out, quiet, hook):
        summary = run(face, audio, output, options, hook)
    for note in summary.notes:
        quiet or typer.echo(f"note: {note}", err=True)
    quiet or typer.echo(f"{summary.frames} frames ({summary.faces} dubbed, {summary.passed_through} without a face) "
                        f"in {summary.seconds:.1f} s, {summary.fps:.1f} fps, backbone {summary.backbone} on {summary.device} "
                        f"({summary.precision})", err=True)
    if json_output:
        import json

        typer.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        typer.echo(str(summary.output))


def _check_lipsync_adapt(adapt: bool, steps: Optional[int], minutes: Optional[float], out: Optional[Path],
                         options) -> None:
    """The --adapt options: values, and combinations with the other lipsync options."""
    for option, value in (("--adapt-steps", steps), ("--adapt-minutes", minutes), ("--adapt-out", out)):
        if value is not None and not adapt:
            raise check.OptionError(option, value, "applies with --adapt")
    if not adapt:
        return
    if options.weights is not None:
        raise check.OptionError("--weights", options.weights, "cannot be combined with --adapt (which adapts "
                                "the shipped weights); dub with an adapted file through --weights alone")
    for option, value in (("--face", options.face), ("--face-index", options.face_index or None),
                          ("--face-box", options.face_box), ("--face", options.voices)):
        if value is not None:
            shown = " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
            raise check.OptionError(option, shown, "cannot be combined with --adapt, which adapts to the largest face")
    if steps is not None:
        check.number("--adapt-steps", steps, low=1, what="optimiser steps")
    if minutes is not None:
        check.number("--adapt-minutes", minutes, above=0)


@contextmanager
def _adapted(adapt: bool, face: Path, audio: Optional[Path], output: Path, options, steps: Optional[int],
             minutes: Optional[float], out: Optional[Path], quiet: bool, hook):
    """With --adapt: check the whole lipsync request, adapt the backbone to FACE (into `out` or a
    temporary file) and point options.weights at the result for the block; else nothing."""
    if not adapt:
        yield
        return
    import tempfile

    from dubber import media
    from dubber.train.adapt import adapt as run_adapt
    from dubber.train.adapt import check_adapt

    backbone = options.backbone or ADAPT_BACKBONE
    max_seconds = minutes * 60 if minutes is not None else None
    inputs = [media.check_input(face)] + ([media.check_input(audio)] if audio is not None else [])
    check.output_file("-o", output, inputs, options.overwrite)  # the dub is checked before the adaptation
    if out is not None:
        check.output_file("--adapt-out", out, inputs, overwrite=True, suffixes=(".pt",))
    options.check_input(check_adapt(face, out, backbone, steps, max_seconds, options.device, out_option="--adapt-out"))
    log = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
    with tempfile.TemporaryDirectory(prefix="dubber-adapt-") as work:
        options.weights = run_adapt(face, out or Path(work) / f"{backbone}-{face.stem}.pt", backbone, steps,
                                    max_seconds, options.device, log=log, progress=hook)
        yield


def _check_lipsync_ray(address: Optional[str], cpus: Optional[float], gpus: Optional[float], jobs: int,
                       is_batch: bool, options) -> Optional[dict]:
    """The --ray options -> batch_ray.run_batch's settings (None without --ray)."""
    for option, value in (("--ray-cpus", cpus), ("--ray-gpus", gpus)):
        if value is not None and address is None:
            raise check.OptionError(option, value, "applies with --ray")
    if address is None:
        return None
    if not is_batch:
        raise check.OptionError("--ray", address, "runs batches: FACE must be a folder or a CSV manifest")
    if jobs != 1:
        raise check.OptionError("--jobs", jobs, "does not apply with --ray: as many jobs run at once as the Ray "
                                "cluster's CPUs and GPUs allow (see --ray-cpus, --ray-gpus)")
    from dubber import batch_ray

    settings = dict(address=address, cpus=1.0 if cpus is None else cpus, gpus=0.0 if gpus is None else gpus)
    batch_ray.check(settings["address"], settings["cpus"], settings["gpus"], options.device, options.half)
    return settings


def _parse_faces(values: List[str]):
    """--face values -> (one face id or None, {id: speech path} or None): `ID` once, or `ID=AUDIO` repeated."""
    chosen, voices = None, {}
    for text in values:
        key, sep, path = text.partition("=")
        if not key.strip().isdigit() or (sep and not path):
            raise check.OptionError("--face", text, "must be ID (a face id of `dubber faces`) or ID=AUDIO")
        if not sep:
            if chosen is not None or len(values) > 1:
                raise check.OptionError("--face", text, "give one face id, or ID=AUDIO for each speaker")
            chosen = int(key)
        elif int(key) in voices:
            raise check.OptionError("--face", text, f"face {int(key)} is given twice")
        else:
            voices[int(key)] = Path(path)
    return chosen, voices or None


def _lipsync_batch(face: Path, audio: Optional[Path], output: Path, options, workers: int, quiet: bool,
                   notes: List[str], json_output: bool = False, on_ray: Optional[dict] = None):
    import contextlib
    import io

    from rich.table import Table
    from rich.text import Text

    from dubber import batch

    check.output_folder("-o", output)
    if face.suffix.lower() == ".csv" and not face.is_dir():
        check.input_file(face)
        jobs = batch.plan_from_manifest(face, output)
    else:
        if audio is None:
            _fail("a folder of faces needs AUDIO: a folder (paired by name) or one audio file", EXIT_USAGE)
        if not audio.is_dir():
            check.input_file(audio)
        jobs = batch.plan_from_folders(face, audio, output)
    for note in notes:
        quiet or typer.echo(f"note: {note}", err=True)
    output.mkdir(parents=True, exist_ok=True)
    console = _stderr_console()
    def log(result, status=None):
        quiet or console.print(f"[{status or result.status}] {result.job.face.name}: {result.message}",
                               markup=False, highlight=False)

    with _progress(quiet) as hook:
        def on_result(result):
            log(result)
            hook and hook("jobs", 1, len(jobs))

        def on_retry(result):
            log(result, "retry")

        if on_ray is None:
            results = batch.run_batch(jobs, options, workers, on_result, on_retry)
        else:
            from dubber import batch_ray

            # Ray's driver prints cluster events (a worker that died) on stdout, which holds results only
            with contextlib.redirect_stdout(io.StringIO() if quiet else sys.stderr):
                results = batch_ray.run_batch(jobs, options, **on_ray, on_result=on_result, on_retry=on_retry)
    failed = sum(r.status == "failed" for r in results)
    if json_output:
        import json

        typer.echo(json.dumps([{"face": str(r.job.face), "audio": str(r.job.audio), "output": str(r.job.output),
                                "status": r.status, "detail": r.message, "seconds": r.seconds,
                                "attempts": r.attempts} for r in results], indent=2))
        if failed:
            _fail(f"{failed} of {len(results)} items failed")
        return
    table = Table(title="dubber batch")
    for column in ("face", "audio", "output", "status", "detail", "tries"):
        table.add_column(column)
    for r in results:
        # Text, not markup: file names and messages may hold [brackets]
        table.add_row(*(Text(str(v)) for v in (r.job.face.name, r.job.audio.name, r.job.output, r.status, r.message,
                                               r.attempts or "")))
    from rich.console import Console

    Console().print(table)
    if failed:
        _fail(f"{failed} of {len(results)} items failed")


@app.command()
def preprocess(
    inputs: List[Path] = typer.Argument(..., help="Photos or videos (or folders of them)."),
    output: Path = typer.Option(..., "-o", "--output", help="Cache folder: one .npz per input."),
    crop: List[str] = typer.Option([], help="Crops to store, kind:size (face:96, lips:64, box:128; 16-1024 px). Default: face:96 box:128."),
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
            raise check.OptionError("--crop", text, str(exc).split("; got")[0].split(", got")[0]) from None
    check.choice("--detector", detector, check.DETECTORS)
    check.number("--face-index", face_index, low=0, what="0 is the largest face")
    check.output_folder("-o", output)
    for path in inputs:
        if not path.is_dir():
            check.input_file(path)
    files = [f for path in inputs for f in (media.list_media(path, "face") if path.is_dir() else [path])]
    if not files:
        _fail(f"{', '.join(map(str, inputs))}: no photo or video to preprocess")
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
        raise typer.Exit(EXIT_INPUT)


@app.command()
def blend(
    source: Path = typer.Argument(..., help="The original photo or video."),
    cache: Path = typer.Argument(..., help="Its preprocess cache (.npz)."),
    crops: Path = typer.Argument(..., help="Generated crops: a video or a folder of images, one per frame."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .mp4."),
    mode: str = typer.Option("feather", help="feather, poisson or alpha."),
    audio: Optional[Path] = typer.Option(None, help="Audio for the output (default: the source's)."),
    crf: int = typer.Option(VIDEO_CRF, help="H.264 quality (0-51, lower is better)."),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Paste generated face crops back into the source frames."""
    from dubber.pipeline import blend_video

    with _progress(quiet) as hook:
        summary = blend_video(source, cache, crops, output, mode, audio, overwrite, progress=hook, crf=crf)
    for note in summary.notes:
        quiet or typer.echo(f"note: {note}", err=True)
    typer.echo(str(summary.output))


def _check_train(backbone: str, data: Path, cache: Path, out: Optional[Path], force: bool, steps: int,
                 batch_size: Optional[int], device: str, grid_every: int, sync_expert: Optional[Path],
                 val_every: int, patience: int, log_every: int, checkpoint_every: int, workers: int) -> None:
    from dubber.backbones import in_weights_dir, models
    from dubber.train.recipes import trainable

    names = trainable()
    if backbone not in names:
        known = "not implemented yet" if backbone not in models() else "has no training recipe"
        from dubber.backbones import PLANNED

        problem = known if backbone in models() or backbone in PLANNED else "unknown model"
        raise check.OptionError("--backbone", backbone, f"{problem}; trainable: {', '.join(names)}")
    for option, value, low in (("--steps", steps, 1), ("--grid-every", grid_every, 1), ("--log-every", log_every, 1),
                               ("--checkpoint-every", checkpoint_every, 1), ("--val-every", val_every, 0),
                               ("--patience", patience, 0)):
        check.number(option, value, low=low)
    check.number("--workers", workers, 1, 64, what="processes")
    if batch_size is not None:
        check.number("--batch-size", batch_size, 1, check.MAX_BATCH_FRAMES)
    if patience and not val_every:
        raise check.OptionError("--patience", patience, "early stopping needs validation: add --val-every N")
    check.device("--device", device)
    check.existing_folder("--data", data)
    check.output_folder("--cache", cache)
    if sync_expert is not None:
        check.existing_file("--sync-expert", sync_expert)
    if out is not None:
        check.output_file("--out", out, overwrite=True, suffixes=(".pt",))
        if in_weights_dir(out) and not force:
            raise check.OptionError("--out", out, "would replace a shipped file in weights/; add --force to do that")


@app.command()
def train(
    backbone: str = typer.Option("dck", help="What to train: a backbone (dck, ...) or syncnet (the lip-sync expert)."),
    data: Path = typer.Option(Path("../shared/data"), help="Corpus root (grid/, wild/, manifest_wild.csv)."),
    cache: Path = typer.Option(Path("cache"), help="Preprocess cache folder (outside version control)."),
    pack: Optional[Path] = typer.Option(None, help="Train on a training pack (python -m dubber.train.pack) instead of --data/--cache."),
    out: Optional[Path] = typer.Option(None, help="Model file to write, .pt (default: runs/<name>-<date>/<name>.pt)."),
    force: bool = typer.Option(False, help="Allow --out to name a shipped file in weights/."),
    steps: int = typer.Option(20000, help="Total optimiser steps (a resumed run continues to this count)."),
    minutes: Optional[float] = typer.Option(None, help="Stop after this much training time (resumable; rerun to go on)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: the recipe's)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    grid_every: int = typer.Option(3, help="Use every n-th GRID training sentence."),
    sync_expert: Optional[Path] = typer.Option(None, help="A trained syncnet file to add a lip-sync loss (dck)."),
    resume: bool = typer.Option(True, help="Continue from the training checkpoint beside OUT."),
    val_every: int = typer.Option(0, help="Validate on held-out identities every N steps (0: never)."),
    patience: int = typer.Option(0, help="Stop after N validations without improvement (0: never; needs --val-every)."),
    log_every: int = typer.Option(50, help="Log mean losses every N steps."),
    checkpoint_every: int = typer.Option(500, help="Write the resumable training state every N steps."),
    workers: int = typer.Option(2, help="Processes building the preprocess cache (1-64)."),
    offsets: Optional[Path] = typer.Option(None, help="Measured audio-visual lags (weights/offsets.csv; python -m dubber.train.offsets)."),
    set_: List[str] = typer.Option([], "--set", help="A recipe hyperparameter, KEY=VALUE (repeatable): --set init=weights/dck.pt"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train a backbone or the sync expert from scratch on the corpus; checkpoints and resumes."""
    import datetime

    from dubber.train import distributed, train_from_corpus

    _check_train(backbone, data, cache, out, force, steps, batch_size, device, grid_every, sync_expert, val_every,
                 patience, log_every, checkpoint_every, workers)
    if offsets is not None:
        check.existing_file("--offsets", offsets)
    if minutes is not None:
        check.number("--minutes", minutes, above=0)
    if pack is not None:
        check.existing_file("--pack", pack / "clips.npz")
        if val_every:
            raise check.OptionError("--val-every", val_every, "a pack holds only the mouth's landmarks, not the 68 validation refits: drop --pack or --val-every")
    hyperparameters = _recipe_settings(backbone, set_, batch_size, sync_expert)
    if out is None:
        out = Path("runs") / f"{backbone}-{datetime.datetime.now():%Y%m%d-%H%M%S}" / f"{backbone}.pt"
    main = distributed.is_main()  # under torchrun, process 0 alone reports and writes
    quiet = quiet or not main
    above = check.nearest_existing(out.parent)  # the folders made below it go again if training fails at once
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
    log = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
    try:
        with _progress(quiet) as hook:
            written = train_from_corpus(backbone, data, cache, out, steps, batch_size, device, grid_every, resume,
                                        sync_expert, val_every, patience, log_every, checkpoint_every, workers,
                                        hyperparameters=hyperparameters, offsets=offsets, log=log, progress=hook,
                                        max_seconds=minutes * 60 if minutes else None, pack=pack)
    except BaseException:
        if main:
            _remove_empty_folders(out.parent, above)
        raise
    distributed.leave()
    if main:
        typer.echo(str(written))


def _remove_empty_folders(folder: Path, above: Path) -> None:
    """Remove `folder` and its parents up to (not including) `above` while they are empty: the run
    folder of a training that failed before writing anything."""
    folder, above = Path(os.path.abspath(folder)), Path(os.path.abspath(above))
    while folder != above and above in folder.parents:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        folder = folder.parent


def _recipe_settings(backbone: str, texts: List[str], batch_size: Optional[int],
                     sync_expert: Optional[Path]) -> dict:
    """--set KEY=VALUE values -> the recipe's hyperparameters, each checked against the recipe: a
    field it has, a value of that field's type (numbers: not negative), before any work."""
    import dataclasses
    import json

    from dubber.train.recipes import recipe_for

    fields = {f.name: f for f in dataclasses.fields(type(recipe_for(backbone)))}
    if sync_expert is not None and "sync_expert" not in fields:
        raise check.OptionError("--sync-expert", sync_expert, f"{backbone} trains without a sync expert loss")
    values = {}
    for text in texts:
        key, equals, raw = text.partition("=")
        if not equals or not key:
            raise check.OptionError("--set", text, "must be KEY=VALUE")
        if key not in fields:
            raise check.OptionError("--set", text, f"{backbone} has no hyperparameter {key}; it has: "
                                                   f"{', '.join(sorted(fields))}")
        default = fields[key].default
        try:
            value = json.loads(raw)  # numbers, true/false, [lists]
        except ValueError:
            value = raw  # anything else is a string (a path)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise check.OptionError("--set", text, f"{key} must be true or false")
        elif isinstance(default, (int, float)):
            integer = isinstance(default, int)
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise check.OptionError("--set", text, f"{key} must be {'a whole number' if integer else 'a number'}")
            low = 1 if key == "batch_size" else 0
            if value != value or value < low:  # NaN
                raise check.OptionError("--set", text, f"{key} must be at least {low}")
            value = value if integer else float(value)
        elif isinstance(default, tuple):
            if (not isinstance(value, list) or len(value) != len(default)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise check.OptionError("--set", text, f"{key} must be {len(default)} numbers, e.g. "
                                                       f"{key}={json.dumps(list(default))}")
            value = tuple(value)
        elif isinstance(default, str):
            value = raw
        values[key] = value
    try:  # whatever else the recipe itself checks
        recipe_for(backbone, **{**values, **({"batch_size": batch_size} if batch_size else {})})
    except DubberError as exc:
        raise check.OptionError("--set", " ".join(texts), str(exc)) from None
    return values


@app.command()
def adapt(
    video: Path = typer.Argument(..., help="Video of the person to dub, with their own speech."),
    output: Path = typer.Option(..., "-o", "--output", help="Model file to write, .pt (a rerun continues from the "
                                                             "checkpoint beside it)."),
    backbone: str = typer.Option(ADAPT_BACKBONE, help="Backbone whose shipped weights are adapted."),
    steps: Optional[int] = typer.Option(None, help="Total optimiser steps (default: the backbone's: "
                                                   f"{_STEPS_NOTE}; a rerun continues to this count)."),
    minutes: Optional[float] = typer.Option(None, help=f"Stop after this many minutes in all, preprocessing "
                                                       f"included (default {ADAPT_MINUTES:g}; rerun to go on)."),
    cache: Optional[Path] = typer.Option(None, help="Keep the preprocess cache in this folder (default: a "
                                                    "temporary one)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Fine-tune a backbone on one video of a person (its frames and own speech) for dubbing them:
    `dubber adapt person.mp4 -o person.pt`, then `dubber lipsync person.mp4 speech.wav --weights
    person.pt -o out.mp4`."""
    from dubber.train.adapt import adapt as run

    if cache is not None:
        check.output_folder("--cache", cache)
    log = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
    with _progress(quiet) as hook:
        written = run(video, output, backbone, steps, minutes * 60 if minutes is not None else None, device, cache,
                      log=log, progress=hook)  # checks every option first
    quiet or typer.echo(f"dub with: dubber lipsync {video} SPEECH --weights {written} -o OUT.mp4", err=True)
    typer.echo(str(written))


def _check_eval(dataset: str, root: Path, backbone: List[str], split: Optional[Path], limit: Optional[int],
                mode: str, out: Path, sync_expert: Optional[Path], no_sync_expert: bool, device: str) -> None:
    from dubber.eval.run import DATASETS

    check.choice("--dataset", dataset, DATASETS)
    check.existing_folder("--root", root)
    for name in backbone:
        check.backbone("--backbone", name)
    if split is not None:
        check.existing_file("--split", split)
    if limit is not None:
        check.number("--limit", limit, low=1, what="clips; leave it out for all of them")
    check.choice("--mode", mode, ("video", "photo"))
    check.output_folder("--out", out)
    if sync_expert is not None:
        if no_sync_expert:
            raise check.OptionError("--sync-expert", sync_expert, "cannot be combined with --no-sync-expert")
        check.existing_file("--sync-expert", sync_expert)
    check.device("--device", device)


def _clear_eval_outputs(out: Path) -> None:
    """Remove what an earlier run wrote into `out` (its contact sheets, table and summary), so a
    rerun leaves no stale sheet of a clip it did not score. Nothing else is touched."""
    sheets = out / "sheets"
    if sheets.is_dir():
        for sheet in sheets.glob("*.png"):
            sheet.unlink()
    for name in ("clips.csv", "summary.json", "report.html"):
        if (out / name).is_file():
            (out / name).unlink()


@app.command(name="eval")
def evaluate(
    dataset: str = typer.Option(..., help="grid, lrw or folder."),
    root: Path = typer.Option(..., help="Dataset root (grid: <root>/<speaker>/<utt>.mpg|mp4)."),
    backbone: List[str] = typer.Option([], help="Backbones to score (repeatable); baselines are always scored."),
    split: Optional[Path] = typer.Option(None, help="List of clips (one path per line) or a CSV with file,split (val rows)."),
    limit: Optional[int] = typer.Option(None, help="At most this many clips (at least 1; default: all)."),
    min_seconds: float = typer.Option(0.0, help="Leave out clips shorter than this (seconds)."),
    mode: str = typer.Option("video", help="video (generate from the clip's frames) or photo (from its first frame)."),
    dub: bool = typer.Option(False, help="Also drive each clip with the next clip's speech."),
    out: Path = typer.Option(Path("eval-out"), help="Folder for clips.csv, summary.json, report.html and its files (an earlier run's are replaced)."),
    sync_expert: Optional[Path] = typer.Option(None, help="SyncNet weights (default: weights/syncnet.pt)."),
    no_sync_expert: bool = typer.Option(False, help="Skip LSE-D/LSE-C (model-free sync only)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    mouth_bank_source: Optional[Path] = typer.Option(None, help="Dub the backbones with the mouth bank of this "
                                                                "video of the person (never one of the clips)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Score backbones against ground truth, static-frame and shifted-audio baselines."""
    import json

    from rich.console import Console
    from rich.table import Table

    from dubber.eval import run

    _check_eval(dataset, root, backbone, split, limit, mode, out, sync_expert, no_sync_expert, device)
    if mouth_bank_source is not None:
        check.existing_file("--mouth-bank-source", mouth_bank_source)
    check.seconds("--min-seconds", min_seconds)
    clips = run.list_clips(dataset, root, split, limit, min_seconds)
    expert = None if no_sync_expert else run.load_sync_expert(sync_expert)
    _clear_eval_outputs(out)
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with _progress(quiet) as hook:
        step = (lambda k: hook("evaluate", 1, len(clips))) if hook else None
        summary = run.evaluate(clips, out, backbone, mode, expert, device, dub, log=log, on_clip=step,
                               mouth_bank_source=mouth_bank_source)
    failed = json.loads((out / "summary.json").read_text()).get("failed", [])
    if len(failed) == len(clips):
        _fail(f"every clip failed ({len(clips)} of {len(clips)}), e.g. {failed[0]['error']}")
    table = Table(title=f"dubber eval: {dataset}, {len(clips) - len(failed)} clips, {mode} mode"
                        + (f" ({len(failed)} failed: see {out / 'summary.json'})" if failed else ""),
                  caption=run.TABLE_NOTE if expert is not None else None)
    shown = [c for c in run.COLUMNS if any(c in s for s in summary.values())]
    table.add_column("system", no_wrap=True, min_width=max(map(len, summary)))  # names whole; figures squeeze
    for column in shown:
        table.add_column(column, justify="right")
    for system, values in summary.items():
        table.add_row(system, *[f"{values[c]:.3f}" if c in values else "" for c in shown])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if failed:
        typer.echo(f"note: {len(failed)} of {len(clips)} clips failed and are not in the table "
                   f"(first: {failed[0]['error']})", err=True)
    log(f"report: {out / 'report.html'}")
    typer.echo(str(out))


@app.command()
def faces(
    source: Path = typer.Argument(..., help="Photo or video."),
    preview: Optional[Path] = typer.Option(None, help="Preview image to write, .png (default: <name>.faces.png here)."),
    no_preview: bool = typer.Option(False, "--no-preview", help="Write no preview image."),
    every: float = typer.Option(0.5, help="Seconds between the frames searched for faces (0.04-60)."),
    detector: str = typer.Option("hog", help="hog or cnn."),
    json_output: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
    overwrite: bool = typer.Option(False, help="Replace an existing preview image."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """List the faces in a photo or video: ids, time ranges, boxes, and a preview image of each.

    `dubber lipsync VIDEO AUDIO -o OUT.mp4 --face ID` dubs the face with that id."""
    import json

    from dubber import faces as listing_module
    from dubber import media

    check.number("--every", every, 0.04, 60.0, what="seconds")
    check.choice("--detector", detector, check.DETECTORS)
    if preview is not None and no_preview:
        raise check.OptionError("--preview", preview, "cannot be combined with --no-preview")
    source = check.input_file(source)
    if not no_preview:
        preview = preview or Path(f"{source.stem}.faces.png")
        check.output_file("--preview", preview, [source], overwrite, suffixes=(".png",))
    with _progress(quiet) as hook:
        found = listing_module.list_faces(source, detector, every, hook)
    if not no_preview:
        media.check_output(preview, [source], overwrite)
        media.write_image(preview, listing_module.preview_image(found))
    if json_output:
        data = found.as_dict()
        data["preview"] = None if no_preview else str(preview)
        typer.echo(json.dumps(data, indent=2))
        return
    if not found.faces:
        typer.echo(f"{source}: no face found")
    else:
        typer.echo(f"{'id':>3}  {'from':>9}  {'to':>9}  {'size':>6}  box where first seen (x0,y0,x1,y1)")
        fmt = listing_module.format_time
        for face in found.faces:
            span = ("photo", "") if found.is_image else (fmt(face.start), fmt(face.end))
            typer.echo(f"{face.id:>3}  {span[0]:>9}  {span[1]:>9}  {face.side:>4.0f}px  "
                       + ",".join(str(int(round(v))) for v in face.box))
    if not no_preview:
        typer.echo(f"preview: {preview}")
    if found.faces and not quiet:
        typer.echo(f"dub one with: dubber lipsync {source} AUDIO -o OUT.mp4 --face ID", err=True)


@app.command(name="check")
def check_sync(
    video: Path = typer.Argument(..., help="Video to check: a dub by dubber or by any other tool."),
    speech: Optional[Path] = typer.Argument(None, help="Speech to check its picture against (e.g. the dub's "
                                                       "input audio); default: the video's own audio track."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    detector: str = typer.Option("hog", help="Face detector: hog or cnn."),
    face_index: int = typer.Option(0, help="Which face to check, 0 = largest (see `dubber faces`)."),
    sync_expert: Optional[Path] = typer.Option(None, help="SyncNet weights (default: weights/syncnet.pt, the file "
                                                          "the verdict's thresholds are calibrated on)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Check lip sync: the sync expert's offset and confidence for the whole clip and per second,
    seconds flagged where sync or face tracking failed, and a one-line verdict.

    `dubber check dub.mp4` (its own audio) or `dubber check dub.mp4 speech.wav`."""
    from dubber.analysis import FaceChoice
    from dubber.eval.check import check_sync as run

    check.choice("--detector", detector, check.DETECTORS)
    check.number("--face-index", face_index, low=0, what="0 is the largest face")
    check.device("--device", device)
    if sync_expert is not None:
        check.existing_file("--sync-expert", sync_expert)
    check.input_file(video)
    if speech is not None:
        check.input_file(speech)
    with _progress(quiet) as hook:
        report = run(video, speech, sync_expert, device, FaceChoice(detector=detector, face_index=face_index), hook)
    for note in report.notes:
        quiet or typer.echo(f"note: {note}", err=True)
    if json_output:
        import json

        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    _print_check(report)


def _print_check(report) -> None:
    """The per-second table, the whole clip's row and the verdict line, on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dubber.eval.check import OK

    def cells(figures, fps):
        if figures.offset is None:
            return [str(figures.windows), "", "", "", "", ""]
        return [str(figures.windows), f"{figures.offset:+d}", f"{figures.offset / fps:+.2f}",
                f"{figures.confidence:.3f}", f"{figures.needed:.3f}", f"{figures.lse_d:.3f}"]

    against = report.speech if report.speech is not None else "its own audio"
    table = Table()
    for column in ("seconds", "face", "speech", "windows", "offset", "offset s", "confidence", "needed", "LSE-D", "flag"):
        table.add_column(column, justify="left" if column in ("seconds", "flag") else "right")
    for s in report.segments:
        flag = Text(s.flag, style="green" if s.flag == OK else "yellow")
        table.add_row(f"{s.start:.1f}-{s.end:.1f}", f"{s.face:.0%}", f"{s.speech:.0%}",
                      *cells(s.figures, report.fps), flag, end_section=s is report.segments[-1])
    table.add_row("whole clip", f"{report.face:.0%}", f"{report.speech_fraction:.0%}", *cells(report.clip, report.fps),
                  Text(report.verdict, style="bold"))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(Text(f"{report.video} against {against}: {report.frames} frames at {report.fps:g} fps"))
    console.print(table)
    console.print(Text("offset: frames (and seconds) the sound is off, negative = audio late, positive = audio early\n"
                       "confidence: LSE-C at that offset; the mouth follows the speech from `needed` on\n"
                       f"expert: {report.expert} (sha256 {report.expert_sha256[:12]})"), style="dim")
    console.print(Text(f"verdict: {report.verdict_text}"))


@app.command()
def backbones():
    """List backbones and whether trained weights are present."""
    from dubber.backbones import DEFAULT_PHOTO_BACKBONE, DEFAULT_VIDEO_BACKBONE, PLANNED, models, weights_path

    registry = models()
    for name in sorted(set(PLANNED) | set(registry)):
        if name not in registry:
            typer.echo(f"{name:10s} not implemented")
            continue
        cls = registry[name]
        shape = (f"window {cls.window}, overlap {cls.overlap}, {'stateful' if cls.stateful else 'stateless'}, "
                 f"{cls.crop}, identity: {cls.conditioning}"
                 f"{', mouth shapes rendered from the video: videos only' if cls.returns_points else ''}") \
            if hasattr(cls, "window") else cls.role
        weights = weights_path(name)
        state = (f"weights: {weights}" if weights.is_file() else
                 "no weights needed" if not getattr(cls, "needs_weights", True) else "no trained weights")
        default = [f"default for {kind}" for kind, chosen in (("videos", DEFAULT_VIDEO_BACKBONE),
                                                               ("photos", DEFAULT_PHOTO_BACKBONE)) if chosen == name]
        typer.echo(f"{name:10s} {state}  ({shape}){'; ' + ', '.join(default) if default else ''}")


def _click_errors(*names: str):
    """Click's exception classes: vendored inside typer (>= 0.17) or the click package (older typer);
    a name this click lacks is a class nothing raises."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions
    return tuple(getattr(exceptions, name, type(name, (Exception,), {})) for name in names)


def _usage_message(exc) -> str:
    """A click usage error as one line naming the option and the value typed."""
    (BadParameter,) = _click_errors("BadParameter")

    message = exc.format_message().strip().replace("\n", " ")
    param = getattr(exc, "param", None)
    if isinstance(exc, BadParameter) and param is not None and getattr(param, "param_type_name", "") == "option":
        args = sys.argv[1:]
        for k, arg in enumerate(args):
            for opt in param.opts:
                if arg == opt and k + 1 < len(args):
                    return f"{opt} {check.show(args[k + 1])}: {message.split(': ', 1)[-1]}"
                if arg.startswith(opt + "="):
                    return f"{opt} {check.show(arg[len(opt) + 1:])}: {message.split(': ', 1)[-1]}"
    return message


# The interpreter's last garbage collection walks every object torch created: ~0.4 s of each run's
# exit here. At exit (after main returns, before that collection) the objects are frozen, so it
# skips them; the process is ending, so nothing is lost.
atexit.register(gc.freeze)


def main():
    """Console entry point: one-line errors instead of tracebacks, with exit codes by kind."""
    NoArgsIsHelpError, UsageError = _click_errors("NoArgsIsHelpError", "UsageError")
    try:
        command = typer.main.get_command(app)
        code = command.main(args=sys.argv[1:], prog_name="dubber", standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
            typer.echo("error: interrupted", err=True)
        sys.exit(code if isinstance(code, int) else 0)
    except check.OptionError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except DubberError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INPUT)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else " (see dubber --help)"
        typer.echo(f"error: {_usage_message(exc)}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:
        if os.environ.get("DUBBER_DEBUG"):
            raise
        typer.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with DUBBER_DEBUG=1 for details", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
