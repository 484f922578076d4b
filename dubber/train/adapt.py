"""Adaptation: fine-tune a backbone's shipped weights on one video of the person to dub.

The video is training data for exactly the face to animate: its frames and its own speech. The
backbone's usual recipe (dubber.train.recipes) starts from the shipped file (`init`) and runs
restricted to this one video, through the one loop (dubber.train.loop): the same self-supervised
samples (for DCK, identity frame and mouth donor drawn from distant frames, never the target), a
resumable checkpoint beside the output and a time budget. The video's audio is shifted by its own
audio-visual lag, measured with the sync expert first. The written model file is
self-describing, and its meta["adapted"] records the source video, the base weights, the lag, the
steps and the time taken.

`adapt` is the one entry to it for the CLI (`dubber adapt`, `dubber lipsync --adapt`) and Python
callers (the pipeline never imports training code); `check_adapt` is its validation, for a caller
that checks a whole request before any work.
"""

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from dubber import media
from dubber.analysis import ProgressHook
from dubber.audio import MEL_WINDOW
from dubber import options as check
from dubber.errors import DubberError

PathLike = Union[str, Path]

# Default optimiser steps of the backbones that can be adapted (a backbone is adaptable when it
# has an entry; the batch is its recipe's). dck: 300 steps of 16 samples draw 4,800 targets, about
# three passes over the 1,500 frames of a one-minute 25 fps clip -- a fine-tune towards one
# person's mouth, far short of the ~9,000 steps on up to 65 identities the shipped file was
# trained with. A step costs about 1.1 CPU-seconds at 128 px (measured on this project's 2-core machine),
# so 300 steps take some 5 minutes on one free core; a GPU does them in seconds.
# rewrite: 200 steps of 256 frames (~0.07 s each, no pixels) pass over a 30 s clip's 750 frames
# some 70 times: its mouth shapes and this speaker's way of making them, in well under a minute.
DEFAULT_STEPS: Dict[str, int] = {"dck": 300, "rewrite": 200}
# What `dubber adapt` and `lipsync --adapt` adapt unless told: dck, whose mouth adaptation sharpens
# and moves closer to the person's (README). Adapting session 9's rewrite made it worse on the three
# held-out 30 s people (LMD 2.216 -> 2.293, LSE-C0 0.039 -> 0.009; its generic file already
# renders the person's own mouths), so rewrite adapts only when asked.
DEFAULT_BACKBONE = "dck"
# The whole adaptation (preprocessing, lag, training) stops after this many minutes unless told
# otherwise (--minutes): on a laptop CPU the steps then end early (a rerun continues), on a GPU
# all of them fit. Half a minute under the 5 minutes for a minute of 720p: start-up, the
# step that crosses the budget and writing the file come on top (23 s seen under load).
DEFAULT_MINUTES = 4.5
# Seconds of video adapted on: a longer one is cut to its first this-many (a stream copy, no
# re-encode), which bounds the cache (all crops are held in memory) and the preprocessing time
# (a minute of 720p took 4.5 of the 5 minutes to track under load). 300 steps of 16 samples pass
# over its 750 frames six times; the held-out figures of the README were adapted on 20 s.
MAX_VIDEO_SECONDS = 30.0
# Speech with a visible face needed (seconds, as dubber.audio.speech_frames counts it: its loud
# frames; a 3 s GRID sentence counts 0.9 s): less cannot show a person's mouth shapes, nor give
# the sync expert windows to measure the video's lag.
MIN_SPEECH_SECONDS = 0.5
# Steps between resumable checkpoints: an interrupted or crashed adaptation loses at most this much
# (Ctrl-C and the time budget save at once anyway); writing one takes well under a second.
CHECKPOINT_EVERY = 100
LOG_EVERY = 50  # steps between loss lines in the log
FINGERPRINT_CHARS = 12  # hex digits of (video, base weights) in the checkpoint's name
STAGE = "adapt"  # the progress stage the loop's "train" steps are shown as


def adaptable() -> List[str]:
    """Backbones `adapt` supports (those with a default step count)."""
    return sorted(DEFAULT_STEPS)


def describe_source(video: PathLike, info: Optional[media.MediaInfo] = None) -> Dict[str, object]:
    """What an adapted file records of its video: name, duration (s) and the file's sha256."""

    video = Path(video)
    info = info or media.probe(video)
    return {"name": video.name, "duration_s": round(float(info.duration), 3), "sha256": media.file_sha256(video)}


def describe_base(path: PathLike) -> Dict[str, object]:
    """What an adapted file records of its base weights: path and state_sha256 (from the base
    file's meta when it records one, else computed from its state)."""
    from dubber.checkpoint import load_package, state_sha256

    package = load_package(path)
    digest = package.get("meta", {}).get("state_sha256") or state_sha256(package["state"])
    return {"path": str(Path(path).resolve()), "state_sha256": digest}


def checkpoint_path(out_path: PathLike, source_sha256: str, base_sha256: str) -> Path:
    """The resumable training state of `out_path` for this video and these base weights:
    <stem>.<fingerprint>.train.pt beside it, so a rerun continues and another video starts afresh."""
    out_path = Path(out_path)
    fingerprint = hashlib.sha256(f"{source_sha256}:{base_sha256}".encode()).hexdigest()[:FINGERPRINT_CHARS]
    return out_path.with_name(f"{out_path.stem}.{fingerprint}.train.pt")


def check_adapt(video: PathLike, out_path: Optional[PathLike] = None, backbone: str = DEFAULT_BACKBONE,
                steps: Optional[int] = None, max_seconds: Optional[float] = None,
                device: str = "auto", out_option: str = "-o") -> media.MediaInfo:
    """Check an adaptation request before any work: OptionError (usage) or DubberError (input).
    Returns the video's probe. out_path None: the caller picks a temporary file; out_option: the
    option that names it, in errors."""
    from dubber.backbones import in_weights_dir, weights_path

    check.choice("--backbone", backbone, adaptable())
    if steps is not None:
        check.number("--steps", steps, low=1, what="optimiser steps")
    if max_seconds is not None:
        check.number("--minutes", max_seconds / 60, above=0)
    check.device("--device", device)
    base = weights_path(backbone)
    if not base.is_file():
        raise DubberError(f"no shipped weights for {backbone!r} to adapt", base)
    info = media.probe(video)
    if info.is_image:
        raise DubberError("is a photo: adaptation learns from a video of the person (its frames and its own "
                          "speech); one frame has nothing to learn from", info.path)
    if not info.has_video:
        raise DubberError("has no video stream (adaptation needs a video of the person)", info.path)
    if not info.has_audio:
        raise DubberError("has no audio track: adaptation learns the mouth from the video's own speech", info.path)
    from dubber.audio import load_audio

    try:  # a second or so for a long video, before minutes of tracking
        load_audio(info.path)
    except DubberError as exc:
        raise DubberError(f"its {exc.message}: adaptation learns the mouth from the video's own speech",
                          info.path) from None
    if out_path is not None:
        check.output_file(out_option, out_path, [info.path, base], overwrite=True, suffixes=(".pt",))
        if in_weights_dir(out_path):  # a person's model is theirs, never a shipped file
            raise check.OptionError(out_option, out_path, "is in weights/, beside the shipped models: write the "
                                    "adapted model elsewhere")
    return info


def adapt(video: PathLike, out_path: PathLike, backbone: str = DEFAULT_BACKBONE, steps: Optional[int] = None,
          max_seconds: Optional[float] = None, device: str = "auto", cache_dir: Optional[PathLike] = None,
          resume: bool = True, log: Callable[[str], None] = print,
          progress: Optional[ProgressHook] = None) -> Path:
    """Fine-tune `backbone`'s shipped weights on `video` (its frames and own audio, shifted by the
    video's audio-visual lag as the sync expert measures it; at most its first MAX_VIDEO_SECONDS)
    for `steps` optimiser steps in total (default DEFAULT_STEPS) and write the model to out_path.

    max_seconds: a budget for the whole run, preprocessing included (default DEFAULT_MINUTES; the
    loop stops after the step that reaches it, at least one step; a rerun continues). cache_dir: where the preprocess cache goes (default: a temporary folder). With
    `resume`, the checkpoint of this video and base (checkpoint_path) is continued. The output
    is replaced atomically when complete; an interrupted run leaves only the checkpoint.
    Returns out_path.
    """
    import torch

    from dubber.backbones import weights_path
    from dubber.checkpoint import load_package, save_atomic
    from dubber.train.loop import train
    from dubber.train.recipes import recipe_for

    started = time.perf_counter()
    info = check_adapt(video, out_path, backbone, steps, max_seconds, device)
    video, out_path = info.path, Path(out_path)
    steps = steps or DEFAULT_STEPS[backbone]
    max_seconds = DEFAULT_MINUTES * 60 if max_seconds is None else max_seconds
    base = weights_path(backbone)
    source, base_meta = describe_source(video, info), describe_base(base)
    recipe = recipe_for(backbone, init=base_meta["path"])
    specs = list(recipe.crops())
    torch_device = torch.device(check.resolved_device(device))
    with tempfile.TemporaryDirectory(prefix="dubber-adapt-") as work:
        cache_dir = Path(cache_dir) if cache_dir is not None else Path(work) / "cache"
        item = {"path": _first_part(info, Path(work), log), "identity": video.stem, "lag": 0, "video": video}
        log(f"preprocessing {video.name} ({min(info.duration, MAX_VIDEO_SECONDS):.1f} s): face tracking and crops")
        item["lag"] = _measured_lag(item, cache_dir, specs, progress, log)
        clips = _clips(item, cache_dir, specs, progress, recipe.mel_width(), recipe.needs_pixels)
        frames = sum(len(clip["mels"]) for clip in clips)
        training_seconds = max(max_seconds - (time.perf_counter() - started), 1e-3)
        log(f"adapting {backbone} to {video.name}: {frames} frames with a face in {len(clips)} runs; "
            f"{steps} steps of {recipe.batch_size} samples on {torch_device}, within {max_seconds / 60:.3g} min "
            f"in all ({_minutes(training_seconds)} left for training); the first step gives an estimate of the time")
        model_path = Path(work) / out_path.name
        shown = (lambda message: log(message.replace(str(model_path), str(out_path))))
        renamed = (lambda stage, advance, total: progress(STAGE if stage == "train" else stage, advance, total))
        history = train(recipe, clips, model_path, steps, device=torch_device, resume=resume,
              checkpoint_path=checkpoint_path(out_path, source["sha256"], base_meta["state_sha256"]),
              log_every=max(1, min(LOG_EVERY, steps // 4)), checkpoint_every=CHECKPOINT_EVERY,
              data_meta={"source": f"{video.name}: its own frames and audio (lag {item['lag']} frames)"}, log=shown,
              progress=renamed if progress else None, max_seconds=training_seconds)
        package = load_package(model_path)
        package["meta"]["adapted"] = {"source": source, "base": base_meta, "lag": item["lag"],
                                      "steps": package["meta"]["steps"],
                                      "seconds": round(time.perf_counter() - started, 1),
                                      "losses": history}  # mean losses per logged stretch of steps
        save_atomic(package, out_path)
    return out_path


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _first_part(info: media.MediaInfo, work: Path, log: Callable[[str], None]) -> Path:
    """The video itself, or (longer than MAX_VIDEO_SECONDS) its first MAX_VIDEO_SECONDS copied into
    `work` without re-encoding, under the video's name (the cache and the clips are named by it)."""
    if info.duration <= MAX_VIDEO_SECONDS:
        return info.path
    part = work / "part" / info.path.name
    part.parent.mkdir()
    log(f"{info.path.name} is {info.duration / 60:.1f} min long: adapting on its first {MAX_VIDEO_SECONDS:.0f} s")
    return media.copy_start(info.path, MAX_VIDEO_SECONDS, part)


def _measured_lag(item: dict, cache_dir: Path, specs, progress: Optional[ProgressHook],
                  log: Callable[[str], None]) -> int:
    """Frames the video's mouth trails its sound, by the shipped sync expert
    (dubber.train.offsets, as for the corpus); 0 when the expert is not confident. Trained at lag
    0, an adapted model learns the video's own lag and dubs that late or early."""
    from dubber.backbones import load
    from dubber.backbones.syncnet import FACE_CROP
    from dubber.train.offsets import measure_offsets

    clips = _clips(item, cache_dir, list(specs) + [FACE_CROP], progress)
    row = measure_offsets(clips, load("syncnet"), {Path(item["path"]).stem: item["path"].name}, log=lambda m: None)[0]
    if row["lag"] is None:
        log(f"audio-visual lag: not measurable with confidence ({row['speech_windows']} speech windows); using 0")
        return 0
    log(f"audio-visual lag: {row['lag']:+d} frames (sync expert, confidence {max(row['clip_confidence'], row['identity_confidence']):.2f})")
    return int(row["lag"])


def _clips(item: dict, cache_dir: Path, specs, progress: Optional[ProgressHook],
           mel_width: int = MEL_WINDOW, pixels: bool = True) -> List[dict]:
    """The clip dicts of one video (dubber.data; mel windows of mel_width frames, by default the
    sync expert's; without `pixels`, crop transforms only), its cache built first; DubberError naming the
    video when it cannot be preprocessed (no face, no readable frame), its audio is silent or no
    run of consecutive frames with a face is long enough, or it has under MIN_SPEECH_SECONDS of
    speech with a visible face."""
    from dubber import data
    from dubber.cache import load_cache
    from dubber.analysis import ANALYSIS_WORKERS  # a lone video's tracking in two processes

    named = item.get("video", item["path"])  # errors name the user's file, not a part cut from it
    problems: List[str] = []
    built = data.build_cache([item], cache_dir, specs, workers=ANALYSIS_WORKERS, progress=progress,
                             log=problems.append)
    if not built:  # build_cache logs "skipped: <the error>" and goes on; here there is nothing else
        raise DubberError(problems[0].split("skipped: ", 1)[-1] if problems else "could not be preprocessed",
                          None if problems else named)
    if not bool(load_cache(built[0], ["has_audio"])["has_audio"]):
        raise DubberError("its audio is silent: adaptation learns the mouth from the video's own speech", named)
    try:
        clips = data.load_clips([item], cache_dir, specs, mel_width, pixels=pixels)
    except DubberError:
        raise DubberError(f"no run of {data.MIN_RUN} consecutive frames with a face: nothing to adapt on",
                          named) from None
    speech = sum(float(clip["speech"].sum()) / clip["fps"] for clip in clips)
    if speech < MIN_SPEECH_SECONDS:
        raise DubberError(f"has {speech:.1f} s of speech with a visible face; adaptation needs at least "
                          f"{MIN_SPEECH_SECONDS:g} s", named)
    return clips
