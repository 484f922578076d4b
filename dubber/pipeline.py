"""The one core every command shares: stream frames, detect and align, run the backbone, blend, encode.

Two passes over a video: `analyse` decodes once to track the face (landmarks are small, so the
whole track is kept and smoothed with look-ahead), then `lipsync` decodes again and streams
frames through crop -> backbone (dubber.apply: windows, state, gaps) -> paste-back -> encoder.
Memory is bounded by one backbone call's frames whatever the length; the analysis is the same one
the preprocess cache (dubber.cache) stores.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from dubber import audio, media
from dubber.analysis import Analysis, FaceChoice, ProgressHook, analyse, progress_step
from dubber.apply import BATCH_FRAMES, Generator, Step, apply_backbone
from dubber.backbones import DEFAULT_PHOTO_BACKBONE, DEFAULT_VIDEO_BACKBONE, Backbone, load_backbone
from dubber.cache import load_cache
from dubber.blend import BLEND_MODES, lower_face_mask, paste_back
from dubber.conditioning import identity_frame
from dubber.errors import DubberError
from dubber.face.align import crop_transforms, transform_points, warp_crop
from dubber.face.track import DETECT_EVERY

MEL_CHUNK_FRAMES = 256  # output frames whose mel windows are cut at once

PathLike = Union[str, Path]


@dataclass
class LipsyncOptions:
    """Everything `lipsync` can be told; the CLI maps its flags onto this."""

    backbone: Optional[Union[str, Backbone]] = None  # name, instance, or None for the default
    weights: Optional[PathLike] = None
    device: str = "auto"
    half: bool = False
    fps: float = media.DEFAULT_IMAGE_FPS  # frame rate for photo input
    blend: str = "auto"  # auto: alpha for backbones that return α, feather otherwise
    colour_match: bool = True
    detector: str = "hog"
    detect_every: int = DETECT_EVERY
    face_index: int = 0
    face_box: Optional[Tuple[float, float, float, float]] = None
    batch_size: int = BATCH_FRAMES
    crf: int = media.VIDEO_CRF
    overwrite: bool = False

    @property
    def face_choice(self) -> FaceChoice:
        return FaceChoice(self.detector, self.detect_every, self.face_index, self.face_box)


@dataclass
class Summary:
    """What one lipsync run did; printed by the CLI, returned by the API."""

    output: Path
    frames: int = 0
    faces: int = 0
    passed_through: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    backbone: str = ""
    device: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def select_device(name: str = "auto"):
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DubberError("--device cuda asked for, but no CUDA GPU is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DubberError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def pingpong(n_out: int, n_src: int) -> np.ndarray:
    """Source frame for each output frame: forward, then backward, ... ([n_out] int64)."""
    if n_src <= 1:
        return np.zeros(n_out, np.int64)
    period = 2 * (n_src - 1)
    k = np.arange(n_out) % period
    return np.where(k < n_src, k, period - k).astype(np.int64)


def _frames_in_order(analysis: Analysis, order: np.ndarray) -> Iterator[np.ndarray]:
    if analysis.is_image:
        for _ in range(len(order)):
            yield analysis.image
    else:
        yield from media.iter_frames(analysis.info, order.tolist())


def resolve_backbone(options: LipsyncOptions, is_image: bool) -> Backbone:
    if isinstance(options.backbone, Backbone):
        return options.backbone
    name = options.backbone or (DEFAULT_PHOTO_BACKBONE if is_image else DEFAULT_VIDEO_BACKBONE)
    return load_backbone(name, options.weights)


def blend_mode(options: LipsyncOptions, backbone: Backbone) -> str:
    mode = options.blend
    if mode == "auto":
        return "alpha" if backbone.returns_alpha else "feather"
    if mode not in BLEND_MODES:
        raise DubberError(f"unknown blend mode {mode!r}; choose auto, {', '.join(BLEND_MODES)}")
    return mode


def lipsync(face_path: PathLike, audio_path: PathLike, output: PathLike,
            options: LipsyncOptions = LipsyncOptions(), progress: Optional[ProgressHook] = None) -> Summary:
    """Make the face in `face_path` (photo or video) speak `audio_path`; write an MP4 to `output`.

    The output lasts as long as the audio (to within one frame) at the video's frame rate (photo:
    options.fps). A video shorter than the audio plays forward and back; a longer one is cut.
    Frames without a face pass through unchanged.
    """
    started = time.perf_counter()
    face_path, audio_path = media.check_input(face_path), media.check_input(audio_path)
    output = media.check_output(output, [face_path, audio_path], options.overwrite)
    if output.suffix.lower() != ".mp4":
        raise DubberError("output must be an .mp4 file", output)
    wav = audio.load_audio(audio_path)
    analysis = analyse(face_path, options.face_choice, options.fps, progress)
    backbone = resolve_backbone(options, analysis.is_image)
    mode = blend_mode(options, backbone)
    generator = Generator(backbone, select_device(options.device), options.half)

    fps = analysis.fps
    duration = len(wav) / audio.SAMPLE_RATE
    n_out = max(1, int(round(duration * fps)))
    order = pingpong(n_out, len(analysis.track))
    spec = backbone.crop
    source_transforms = crop_transforms(analysis.track.landmarks, spec)
    transforms = source_transforms[order]
    landmarks = analysis.track.landmarks[order]
    identity = None
    index = identity_frame(backbone.conditioning, analysis.track.landmarks, source_transforms)
    if index is not None:
        identity = warp_crop(next(_frames_in_order(analysis, np.array([index]))), source_transforms[index], spec.size)
    mel = audio.log_mel(wav)
    del wav  # 3.8 MB a minute of audio: from here on only its mel features are needed
    summary = Summary(output=output, backbone=getattr(backbone, "name", type(backbone).__name__),
                      device=str(generator.device))
    if len(analysis.track) < n_out and not analysis.is_image:
        summary.notes.append(f"video ({len(analysis.track)} frames) is shorter than the audio: played forward and back")

    def stream() -> Iterator[Step]:
        frames = _frames_in_order(analysis, order)
        for chunk in range(0, n_out, MEL_CHUNK_FRAMES):
            times = np.arange(chunk, min(n_out, chunk + MEL_CHUNK_FRAMES)) / fps
            for t, window in zip(range(chunk, n_out), audio.mel_windows(mel, times, backbone.mel_width)):
                frame = next(frames)
                crop = None if np.isnan(transforms[t, 0, 0]) else warp_crop(frame, transforms[t], spec.size)
                yield Step(crop, window, (frame, transforms[t], landmarks[t]))

    step = progress_step(progress, "lip sync", n_out)
    results = apply_backbone(generator, stream(), identity, options.batch_size)
    with media.atomic_output(output) as tmp:
        with media.VideoWriter(tmp, fps, analysis.info.width, analysis.info.height, audio_path, duration,
                               options.crf) as writer:
            _paste_and_write(writer, results, mode, options.colour_match, summary, step)
        if summary.frames < n_out:
            # The second decode gave fewer frames than the analysis pass saw (a file changing under us).
            raise DubberError(f"video ended early: {summary.frames} of {n_out} frames decoded", face_path)
    summary.seconds = time.perf_counter() - started
    summary.model_seconds = generator.seconds
    return summary


def _paste_and_write(writer: media.VideoWriter, results, mode: str, colour_match: bool, summary: Summary,
                     step) -> None:
    """The one paste loop: results yield ((frame, transform, landmarks), crop, generated); frames
    with a generated crop get it pasted under the lower-face mask, the others pass through."""
    for (frame, matrix, points), crop, generated in results:
        if generated is not None:
            mask = lower_face_mask(transform_points(points, matrix), crop.shape[0])
            frame = paste_back(frame, crop, generated, matrix, mask, mode, colour_match)
            summary.faces += 1
        else:
            summary.passed_through += 1
        writer.write(frame)
        step(1)
    summary.frames = writer.frames_written


def blend_video(source: PathLike, cache_path: PathLike, crops_path: PathLike, output: PathLike,
                mode: str = "feather", audio_path: Optional[PathLike] = None, overwrite: bool = False,
                colour_match: bool = True, progress: Optional[ProgressHook] = None) -> Summary:
    """Paste generated crops (a video or image folder of S×S crops, one per source frame) back into `source`.

    The crops must be cut as the cache's `transform_<kind><S>` describes (the kind is read from
    the cache: the one whose size matches the crops). Audio comes from `audio_path` or the source.
    """
    started = time.perf_counter()
    source = media.check_input(source)
    output = media.check_output(output, [source, cache_path, crops_path], overwrite)
    cache = load_cache(cache_path)
    info = media.probe(source)
    generated = _read_crops(Path(crops_path))
    size = next(iter(generated)).shape[0] if isinstance(generated, list) else generated.size
    keys = [k[len("transform_"):] for k in cache if k.startswith("transform_") and k.endswith(str(size))]
    if not keys:
        raise DubberError(f"cache has no {size}x{size} crop transform matching the crops", cache_path)
    transforms = cache[f"transform_{keys[0]}"]
    landmarks = cache["landmarks"]
    audio_source = audio_path or (source if info.has_audio else None)
    summary = Summary(output=Path(output), backbone="(blend)")
    frames = [media.read_image(source)] * len(transforms) if info.is_image else media.VideoReader(info)
    fps = float(cache["fps"])
    duration = len(transforms) / fps

    def results():
        for t, (frame, crop) in enumerate(zip(frames, generated)):
            matrix = transforms[t]
            original = None if np.isnan(matrix[0, 0]) else warp_crop(frame, matrix, size)
            yield (frame, matrix, landmarks[t]), original, None if original is None else crop

    with media.atomic_output(output) as tmp:
        with media.VideoWriter(tmp, fps, int(cache["width"]), int(cache["height"]), audio_source, duration) as writer:
            _paste_and_write(writer, results(), mode, colour_match, summary,
                             progress_step(progress, "blend", len(transforms)))
    summary.seconds = time.perf_counter() - started
    return summary


class _CropVideo:
    def __init__(self, info: media.MediaInfo):
        self.info = info
        self.size = info.width

    def __iter__(self):
        return iter(media.VideoReader(self.info))


def _read_crops(path: Path):
    """Generated crops from a folder of images (sorted by name) or a video of square frames."""
    if path.is_dir():
        files = media.list_media(path, "face")
        if not files:
            raise DubberError("folder holds no crop images", path)
        return [media.read_image(f) for f in files]
    info = media.probe(path)
    if not info.has_video or info.width != info.height:
        raise DubberError("crops must be square frames (a video or a folder of images)", path)
    return _CropVideo(info)
