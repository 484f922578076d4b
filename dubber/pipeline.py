"""The one core every command shares: stream frames, detect and align, run the backbone, blend, encode.

Two passes over a video: `analyse` decodes once to track the face (landmarks are small, so the
whole track is kept and smoothed with look-ahead; stored by content, so a second dub of the video
skips it), then `lipsync` decodes again and streams frames through crop -> backbone
(dubber.apply: windows, state, gaps; the model's calls on a worker thread) -> paste-back ->
encoder. Memory is bounded by two backbone calls' frames whatever the length; the analysis is the
same one the preprocess cache (dubber.cache) stores.
"""

import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dubber import audio, media
from dubber import options as check
from dubber.analysis import (ANALYSIS_WORKERS, Analysis, FaceChoice, ProgressHook, analyse, analyse_stored,
                             progress_step)
from dubber.apply import BATCH_FRAMES, Generator, Step, apply_backbone
from dubber.backbones import (DEFAULT_PHOTO_BACKBONE, DEFAULT_VIDEO_BACKBONE, Backbone, load_backbone,
                              load_backbone_file, models)
from dubber.cache import load_cache
from dubber.blend import BLEND_MODES, Paster, lower_face_mask
from dubber.conditioning import identity_frame
from dubber.errors import DubberError
from dubber.face.align import crop_transforms, transform_points, warp_crop
from dubber.face.track import DETECT_EVERY

if TYPE_CHECKING:  # built only with --mouth-bank
    from dubber.mouthbank import MouthBank

MEL_CHUNK_FRAMES = 256  # output frames whose mel windows are cut at once
PASTE_AHEAD = 8  # generated frames handed to the paste thread before the oldest is waited for
# A photo's own lips over the generated ones (dubber.mouthbank with the photo's one mouth, warped
# onto the generated lips' landmarks) unless --no-mouth-bank: DCK draws a photo's mouth soft and, on
# a smiling, teeth-showing photo, with dark smears on the lower lip. Photo mode on the val_select
# clips (dubber eval --mode photo), dck without -> with: mouth sharpness 0.44 -> 0.67 of the real
# mouth's, mouth PSNR 22.28 -> 22.54 dB, LMD 1.807 -> 1.806, LSE-C0 0.099 -> 0.067 (real clips
# 0.044), r 0.197 -> 0.204, mouth-opening r 0.23 -> 0.16. (Rewrite's predicted shapes warped onto
# the photo's one mouth instead were sharp but barely moved: LSE-C0 0.023.)
PHOTO_LIPS = True

PathLike = Union[str, Path]


@dataclass
class LipsyncOptions:
    """Everything `lipsync` can be told; the CLI maps its flags onto this. `check` validates it."""

    backbone: Optional[Union[str, Backbone]] = None  # name, instance, or None for the default
    weights: Optional[PathLike] = None
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    half: bool = False  # fp16 on CUDA
    precision: str = "auto"  # auto, fp32 or bf16 (dubber.options.precision): auto is bf16 on CPUs with bf16 units
    fps: Optional[float] = None  # frame rate for photo input (None: media.DEFAULT_IMAGE_FPS); a video keeps its own
    blend: str = "auto"  # auto: alpha for backbones that return α, feather otherwise
    colour_match: bool = True
    detector: str = "hog"
    detect_every: int = DETECT_EVERY
    face_index: int = 0
    face_box: Optional[Tuple[float, float, float, float]] = None
    face: Optional[int] = None  # an id from `dubber faces` (dubber.faces.list_faces)
    batch_size: int = BATCH_FRAMES
    crf: int = media.VIDEO_CRF
    preset: str = media.VIDEO_PRESET  # x264 preset: slower ones make smaller files at the same --crf
    overwrite: bool = False
    start: float = 0.0  # seconds into a FACE video where the part used begins (ffmpeg's -ss)
    duration: Optional[float] = None  # seconds of the FACE video used (ffmpeg's -t); None: to its end
    loop: str = "pingpong"  # speech longer than the video: pingpong, repeat, hold or stretch
    pads: Tuple[int, int, int, int] = (0, 0, 0, 0)  # grow (shrink) the pasted region: top, bottom, left, right px
    smooth: bool = True  # smooth the face alignment over time
    reuse_analysis: bool = True  # keep each input's face analysis (dubber.analysis.analyse_stored) and reuse it
    voices: Optional[Dict[int, PathLike]] = None  # several speakers: face id (`dubber faces`) -> its speech
    # replace the generated lips by the closest real ones (dubber.mouthbank); None: PHOTO_LIPS for a
    # photo (its own lips, warped onto the generated ones), off for a video
    mouth_bank: Optional[bool] = None
    mouth_bank_source: Optional[PathLike] = None  # the video whose mouths the bank holds (None: FACE itself)
    # seconds round each dubbed frame whose mouths a bank from FACE itself may not use (evaluation:
    # the clip's own mouth at that time is the answer being scored)
    mouth_bank_exclude: float = 0.0

    @property
    def face_choice(self) -> FaceChoice:
        return FaceChoice(self.detector, self.detect_every, self.face_index, self.face_box)

    def check(self) -> List[str]:
        """Validate every value (dubber.options): OptionError naming the option on the first bad
        one; returns notes on values that were adjusted (--half without a GPU)."""
        notes: List[str] = []
        if not isinstance(self.backbone, Backbone):
            check.backbone("--backbone", self.backbone)
        if self.weights is not None:
            check.existing_file("--weights", self.weights)
        check.device("--device", self.device)
        check.precision("--precision", self.precision, check.half("--half", self.half, self.device, notes),
                        self.device)
        if self.fps is not None:
            check.number("--fps", self.fps, *check.FPS_RANGE, what="frames per second")
        check.choice("--blend", self.blend, check.BLEND_CHOICES)
        check.choice("--detector", self.detector, check.DETECTORS)
        check.number("--detect-every", self.detect_every, low=1, what="frames")
        check.number("--face-index", self.face_index, low=0, what="0 is the largest face")
        if self.face_box is not None:
            self.face_box = check.face_box("--face-box", self.face_box)
            if self.face_index:
                raise check.OptionError("--face-index", self.face_index, "choose the face with --face-index or "
                                        "--face-box, not both")
        if self.face is not None:
            check.number("--face", self.face, low=0, what="an id listed by `dubber faces`")
            if self.face_index or self.face_box is not None:
                raise check.OptionError("--face", self.face, "choose the face with --face, --face-index or "
                                        "--face-box, not several")
        if self.voices:
            for face_id, voice in self.voices.items():
                shown = f"{face_id}={voice}"
                if not isinstance(face_id, int) or face_id < 0:
                    raise check.OptionError("--face", shown, "must be ID=AUDIO with ID a face id of `dubber faces`")
                if not Path(voice).is_file():
                    raise check.OptionError("--face", shown, f"{voice}: file not found" if not Path(voice).exists()
                                            else f"{voice}: is a folder; name an audio file")
            if self.face is not None or self.face_index or self.face_box is not None:
                raise check.OptionError("--face", " ".join(f"{k}={v}" for k, v in self.voices.items()),
                                        "speakers (--face ID=AUDIO) cannot be combined with --face ID, "
                                        "--face-index or --face-box")
        check.number("--batch-size", self.batch_size, 1, check.MAX_BATCH_FRAMES, what="frames per model call")
        check.number("--crf", self.crf, *check.CRF_RANGE, what="H.264 quality, lower is better")
        check.choice("--preset", self.preset, media.X264_PRESETS)
        check.seconds("--start", self.start)
        check.seconds("--duration", self.duration, allow_zero=False)
        check.choice("--loop", self.loop, check.LOOP_MODES)
        self.pads = check.pads("--pads", self.pads)
        if self.mouth_bank_source is not None:
            check.existing_file("--mouth-bank-source", self.mouth_bank_source)
            if self.mouth_bank is False:
                raise check.OptionError("--mouth-bank-source", self.mouth_bank_source,
                                        "contradicts --no-mouth-bank (it names the mouth bank's video)")
            self.mouth_bank = True
        check.seconds("mouth_bank_exclude", self.mouth_bank_exclude)
        return notes

    def check_input(self, info: media.MediaInfo) -> None:
        """The checks that need the FACE input's description: --fps, --start and --duration."""
        name = info.path.name
        if info.is_image:
            for option, value in (("--start", self.start or None), ("--duration", self.duration)):
                if value is not None:
                    raise check.OptionError(option, value, f"applies to a video; {name} is a photo")
            return
        if self.fps is not None and abs(self.fps - info.fps) > 0.01:
            raise check.OptionError("--fps", self.fps, f"applies to a photo; {name} is a video, which keeps its "
                                    f"own frame rate ({info.fps:.4g} fps)")
        if self.start and info.duration and self.start >= info.duration - 0.5 / info.fps:
            raise check.OptionError("--start", self.start, f"{name} is only {info.duration:.3f} s long")

    def check_bank(self, info: media.MediaInfo, backbone: Backbone) -> Optional[media.MediaInfo]:
        """The mouth bank's source (its probe; None without a bank): a video, or a photo FACE itself
        (its one mouth: see PHOTO_LIPS). A backbone that renders from a bank needs a video."""
        wanted = self.mouth_bank if self.mouth_bank is not None else (info.is_image and PHOTO_LIPS)
        if not (wanted or backbone.returns_points):
            return None
        bank = info if self.mouth_bank_source is None else media.probe(media.check_input(self.mouth_bank_source))
        if bank.is_image and self.mouth_bank_source is None and not backbone.returns_points:
            return bank
        if bank.is_image or not bank.has_video:
            if self.mouth_bank_source is None and backbone.returns_points:
                raise check.OptionError("--backbone", backbone.name, f"renders the person's own mouths from a video; "
                                        f"{bank.path.name} is a photo (one mouth): use --backbone dck, or name a "
                                        "video of the person with --mouth-bank-source")
            option = "--mouth-bank" if self.mouth_bank_source is None else "--mouth-bank-source"
            raise check.OptionError(option, bank.path.name, "the mouth bank needs a video of the person (a photo "
                                    "holds one mouth); name one with --mouth-bank-source")
        return bank


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
    precision: str = ""  # the model's arithmetic: fp32, bf16 or fp16
    notes: List[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """Plain values (for `--json`): every field, the output as a string, and fps."""
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["fps"] = self.fps
        return data


def select_device(name: str = "auto"):
    """'auto' -> CUDA when present, else CPU; cuda or cuda:N without such a GPU is an error
    (dubber.options.device), not a silent fallback."""
    import torch

    return torch.device(check.resolved_device(check.device("--device", name)))


def pingpong(n_out: int, n_src: int) -> np.ndarray:
    """Source frame for each output frame: forward, then backward, ... ([n_out] int64)."""
    if n_src <= 1:
        return np.zeros(n_out, np.int64)
    period = 2 * (n_src - 1)
    k = np.arange(n_out) % period
    return np.where(k < n_src, k, period - k).astype(np.int64)


def source_order(n_out: int, n_src: int, loop: str = "pingpong") -> np.ndarray:
    """Source frame for each of n_out output frames ([n_out] int64). A source at least as long is
    cut; a shorter one is extended by `loop`: pingpong (forward, then backward, ...), repeat
    (from the start again, as Wav2Lip does), hold (the last frame stays) or stretch (slowed to
    fit: each frame shown n_out / n_src times)."""
    k = np.arange(n_out)
    if n_out <= n_src or n_src <= 1:
        return np.minimum(k, max(n_src - 1, 0)).astype(np.int64)
    if loop == "pingpong":
        return pingpong(n_out, n_src)
    if loop == "repeat":
        return (k % n_src).astype(np.int64)
    if loop == "hold":
        return np.minimum(k, n_src - 1).astype(np.int64)
    if loop == "stretch":
        return (k * n_src // n_out).astype(np.int64)
    raise ValueError(f"unknown loop mode {loop!r}")


LOOP_NOTES = {"pingpong": "played forward and back", "repeat": "played again from the start",
              "hold": "its last frame held", "stretch": "slowed down to fit"}


def _frames_in_order(analysis: Analysis, order: np.ndarray, first: int = 0) -> Iterator[np.ndarray]:
    """Frames of the analysed input in `order` (indices into the part analysed, which starts at
    source frame `first`)."""
    if analysis.is_image:
        for _ in range(len(order)):
            yield analysis.image
    else:
        yield from media.iter_frames(analysis.info, (np.asarray(order) + first).tolist())


def resolve_backbone(options: LipsyncOptions, info: media.MediaInfo, notes: Optional[List[str]] = None) -> Backbone:
    """The backbone: options.backbone (a name, or a Backbone object), else the model a --weights file
    holds (an adapted file names its own), else the default for the input -- DEFAULT_VIDEO_BACKBONE
    for a video, DEFAULT_PHOTO_BACKBONE for a photo or for a video part too short for a backbone that
    renders from the video's own mouths (dubber.mouthbank.MIN_ENTRIES frames; a note in `notes`)."""
    if isinstance(options.backbone, Backbone):
        return options.backbone
    if options.backbone:
        return load_backbone(options.backbone, options.weights)
    if options.weights is not None:
        return load_backbone_file(options.weights)
    if info.is_image:
        return load_backbone(DEFAULT_PHOTO_BACKBONE)
    if models()[DEFAULT_VIDEO_BACKBONE].returns_points and options.mouth_bank_source is None:
        from dubber.mouthbank import MIN_ENTRIES

        _, count = _segment(info, options)
        seconds = info.duration - options.start if count is None else count / info.fps
        if info.duration and seconds * info.fps < MIN_ENTRIES:  # decided before any weights are loaded
            if notes is not None:
                notes.append(f"{info.path.name} shows {seconds:.2f} s, too little for {DEFAULT_VIDEO_BACKBONE}'s bank "
                             f"of the person's own mouths ({MIN_ENTRIES} frames): dubbed with {DEFAULT_PHOTO_BACKBONE}")
            return load_backbone(DEFAULT_PHOTO_BACKBONE)
    return load_backbone(DEFAULT_VIDEO_BACKBONE)


def blend_mode(options: LipsyncOptions, backbone: Backbone) -> str:
    mode = check.choice("--blend", options.blend, check.BLEND_CHOICES)
    if mode == "auto":
        return "alpha" if backbone.returns_alpha else "feather"
    return mode


def _segment(info: media.MediaInfo, options: LipsyncOptions) -> Tuple[int, Optional[int]]:
    """(first source frame, frame count or None for all) of the part of a video --start/--duration name."""
    if info.is_image:
        return 0, None
    first = int(round(options.start * info.fps))
    count = None if options.duration is None else max(1, int(round(options.duration * info.fps)))
    return first, count


def _analyse(face_path: Path, options: LipsyncOptions, progress: Optional[ProgressHook],
             info: Optional[media.MediaInfo] = None) -> Analysis:
    """`analyse` (of the part --start/--duration name) with an honest error when --face-index /
    --face-box select no face."""
    try:
        first, count = _segment(info, options) if info is not None else (0, None)
        run = analyse_stored if options.reuse_analysis else analyse
        return run(face_path, options.face_choice, options.fps or media.DEFAULT_IMAGE_FPS, progress,
                   info=info, first=first, count=count, workers=ANALYSIS_WORKERS)
    except DubberError as exc:
        chosen = options.face_index or options.face_box is not None
        if chosen and exc.message.startswith("no face found") and options.face is not None:
            raise check.OptionError("--face", options.face, f"listed in {face_path.name}, but the tracker could not "
                                    "follow it; try --face-box with its box") from None
        if chosen and exc.message.startswith("no face found"):
            from dubber.faces import selection_error

            raise selection_error(face_path, options.detector, options.face_index, options.face_box) from None
        raise


def _face_box_of(face_path: Path, options: LipsyncOptions, progress: Optional[ProgressHook]):
    """The box where face `options.face` of `dubber faces` is first seen: the tracker starts there."""
    from dubber.faces import find, list_faces

    return find(list_faces(face_path, options.detector, progress=progress), options.face).box


def lipsync(face_path: PathLike, audio_path: Optional[PathLike], output: PathLike,
            options: Optional[LipsyncOptions] = None, progress: Optional[ProgressHook] = None,
            **settings) -> Summary:
    """Make the face in `face_path` (photo or video) speak `audio_path`; write an MP4 to `output`.

    Options come as a LipsyncOptions, as keyword arguments named like its fields (the CLI's
    options: `backbone="dck", device="cpu", overwrite=True`), or both (the keywords win).
    `progress(stage, advance, total)` is called as work advances.

    The output lasts as long as the audio (to within one frame) at the video's frame rate (photo:
    options.fps). A video shorter than the audio is extended by options.loop; a longer one is cut.
    Frames without a face pass through unchanged. Every option is checked first
    (`LipsyncOptions.check`: dubber.options.OptionError), then the inputs (DubberError), before
    any decoding.

    Several speakers in one pass: `voices={0: "host.wav", 1: "guest.wav"}` (face ids of
    `list_faces`) dubs each face with its own speech; `audio_path` is then the output's soundtrack,
    or None for the mix of the voices.
    """
    started = time.perf_counter()
    options = dataclasses.replace(options or LipsyncOptions(), **settings)  # a copy: the caller's is not changed
    notes = options.check()
    voices = {k: media.check_input(v) for k, v in (options.voices or {}).items()}
    if audio_path is None and not voices:
        raise check.OptionError("AUDIO", "(none)", "is required (or give each face its speech: --face ID=AUDIO)")
    face_path = media.check_input(face_path)
    audio_path = None if audio_path is None else media.check_input(audio_path)
    inputs = [face_path, audio_path, *voices.values()]
    output = check.output_file("-o", output, inputs, options.overwrite)
    output = media.check_output(output, [p for p in inputs if p is not None], options.overwrite)
    info = media.probe(face_path)
    options.check_input(info)
    backbone = resolve_backbone(options, info, notes)
    bank_info = options.check_bank(info, backbone)
    mode = blend_mode(options, backbone)
    device = select_device(options.device)
    precision = check.precision("--precision", options.precision, check.half("--half", options.half, options.device),
                                options.device)
    generator = Generator(backbone, device, precision, channels_last=True)
    with contextlib.ExitStack() as cleanup:
        if audio_path is None:  # the soundtrack: the voices mixed
            audio_path = cleanup.enter_context(media.mixed_audio(list(voices.values())))
        wav = audio.load_audio(audio_path)
        duration = len(wav) / audio.SAMPLE_RATE
        # speech features per face, before any video work (a bad track fails first); a voice is
        # cut to the soundtrack's length
        mels = {k: audio.log_mel(audio.load_audio(v)[:len(wav)]) for k, v in voices.items()} if voices else \
            {options.face: audio.log_mel(wav)}
        del wav  # 3.8 MB a minute of audio: from here on only its mel features are needed
        if voices:
            from dubber.faces import find, list_faces

            listing = list_faces(face_path, options.detector, progress=progress)
            chosen = [(k, find(listing, k).box, voices[k]) for k in voices]
        else:
            box = _face_box_of(face_path, options, progress) if options.face is not None else options.face_box
            chosen = [(options.face, box, audio_path)]
        first, _ = _segment(info, options)
        speakers = [_speaker(face_path, info, dataclasses.replace(options, face_box=box), face_id, mels[face_id],
                             backbone, progress, first, bank_info) for face_id, box, _ in chosen]
        fps, n_src = speakers[0].analysis.fps, len(speakers[0].analysis.track)
        n_out = max(1, int(round(duration * fps)))
        summary = Summary(output=output, backbone=getattr(backbone, "name", type(backbone).__name__),
                          device=str(generator.device), precision=precision, notes=notes)
        if n_src < n_out and not info.is_image:
            summary.notes.append(f"video ({n_src} frames) is shorter than the audio: {LOOP_NOTES[options.loop]} "
                                 "(--loop)")
        order = source_order(n_out, n_src, options.loop)
        frames = ((frame, False) for frame in _frames_in_order(speakers[0].analysis, order, first))
        for speaker in speakers:  # each speaker's runner reads the frames the previous one pasted into
            frames = _dub(frames, speaker, order, fps, generator, mode, options)
        step = progress_step(progress, "lip sync", n_out)
        width, height = speakers[0].analysis.info.width, speakers[0].analysis.info.height
        with media.atomic_output(output) as tmp:
            with media.VideoWriter(tmp, fps, width, height, audio_path, duration, options.crf,
                                   preset=options.preset) as writer:
                for frame, dubbed in frames:
                    writer.write(frame)
                    summary.faces += dubbed
                    summary.passed_through += not dubbed
                    step(1)
            summary.frames = writer.frames_written
            if summary.frames < n_out:
                # The second decode gave fewer frames than the analysis pass saw (a file changing under us).
                raise DubberError(f"video ended early: {summary.frames} of {n_out} frames decoded", face_path)
    summary.seconds = time.perf_counter() - started
    summary.model_seconds = generator.seconds
    return summary


@dataclass
class _Speaker:
    """One face to dub: its analysis (track), speech features, alignment and identity crop."""

    face_id: Optional[int]
    analysis: Analysis
    mel: np.ndarray
    transforms: np.ndarray  # [n_src, 2, 3] frame -> crop, NaN where no face
    identity: Optional[np.ndarray]
    bank: Optional["MouthBank"] = None  # this face's real mouths (--mouth-bank)


def _speaker(face_path: Path, info: media.MediaInfo, options: LipsyncOptions, face_id: Optional[int], mel: np.ndarray,
             backbone: Backbone, progress: Optional[ProgressHook], first: int,
             bank_info: Optional[media.MediaInfo] = None) -> "_Speaker":
    if progress is not None and options.voices:  # one progress bar per face
        hook = progress
        progress = lambda stage, advance, total: hook(f"{stage} ({face_id})", advance, total)  # noqa: E731
    analysis = _analyse(face_path, options, progress, info)
    transforms = crop_transforms(analysis.track.landmarks, backbone.crop, smooth=options.smooth)
    identity = None
    index = identity_frame(backbone.conditioning, analysis.track.landmarks, transforms)
    if index is not None:
        frame = next(_frames_in_order(analysis, np.array([index]), first))
        identity = warp_crop(frame, transforms[index], backbone.crop.size)
    bank = None
    if bank_info is not None:
        from dubber.mouthbank import build_bank

        shapes = backbone.returns_points  # mouths described as the backbone learnt them
        if bank_info.path == info.path:  # the part being dubbed (--start/--duration): its analysis is at hand
            bank = build_bank(info, analysis.track, backbone.crop, first, options.smooth, progress=progress,
                              shapes_from_track=shapes)
            bank.exclude_radius = int(round(options.mouth_bank_exclude * analysis.fps))
        else:  # another video of the person: the face chosen as in FACE (largest, --face-box ...)
            other = _analyse(bank_info.path, dataclasses.replace(options, start=0.0, duration=None), progress, bank_info)
            bank = build_bank(bank_info, other.track, backbone.crop, 0, options.smooth, progress=progress,
                              shapes_from_track=shapes)
    return _Speaker(face_id, analysis, mel, transforms, identity, bank)


def _dub(frames: Iterator[Tuple[np.ndarray, bool]], speaker: _Speaker, order: np.ndarray, fps: float,
         generator: Generator, mode: str, options: LipsyncOptions) -> Iterator[Tuple[np.ndarray, bool]]:
    """(frame, dubbed so far) for each output frame, with `speaker`'s face dubbed into it where it is found."""
    backbone = generator.backbone
    spec = backbone.crop
    landmarks, boxes = speaker.analysis.track.landmarks, speaker.analysis.track.boxes
    n_out = len(order)

    def steps() -> Iterator[Step]:
        last = None  # (frame, source index, crop): a photo repeats one frame object, cropped once
        for chunk in range(0, n_out, MEL_CHUNK_FRAMES):
            times = np.arange(chunk, min(n_out, chunk + MEL_CHUNK_FRAMES)) / fps
            for t, window in zip(range(chunk, n_out), audio.mel_windows(speaker.mel, times, backbone.mel_width)):
                frame, dubbed = next(frames)
                matrix = speaker.transforms[order[t]]
                if last is not None and last[0] is frame and last[1] == order[t]:
                    crop = last[2]
                else:
                    crop = None if np.isnan(matrix[0, 0]) else warp_crop(frame, matrix, spec.size)
                    last = frame, order[t], crop
                yield Step(crop, window, (frame, dubbed, matrix, landmarks[order[t]], boxes[order[t]], order[t]))

    bank = speaker.bank
    if bank is not None:
        from dubber.mouthbank import crop_box
    paster = None  # the last frame's, reused while the frame object and its crop repeat (a photo)

    def paste(result) -> Tuple[np.ndarray, bool]:
        nonlocal paster
        (frame, dubbed, matrix, points, box, source), crop, generated = result
        if generated is None:
            if bank is not None:
                bank.reset()  # a gap: the next run starts its own sequence of real mouths
            return frame, dubbed
        if backbone.returns_points:  # a mouth shape: the bank's real mouth closest to it
            generated = bank.render_shape(generated, source, backbone.points_centred)
        elif bank is not None:  # in order on the paste thread: the bank's pick follows the frames
            generated = bank.render(generated, crop_box(box, matrix))
        if paster is None or paster.frame is not frame or paster.source_crop is not crop:
            paster = _paster(frame, crop, matrix, points, mode, options.colour_match, options.pads)
        return paster(generated), True

    yield from _on_paste_thread(paste, apply_backbone(generator, steps(), speaker.identity, options.batch_size))


def _on_paste_thread(paste, results: Iterator) -> Iterator:
    """paste(result) for each result, in order, on one worker thread while this thread decodes, crops
    and feeds the model: the paste is the longest serial step of a frame (OpenCV and numpy release
    the GIL for most of it), and on the caller's thread it left a core ~15 % idle. At most
    PASTE_AHEAD frames wait for their paste, so memory stays bounded."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dubber-paste") as worker:
        pending: Deque = collections.deque()
        for result in results:
            pending.append(worker.submit(paste, result))
            if len(pending) > PASTE_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _paster(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray, points: np.ndarray, mode: str,
            colour_match: bool, pads: Sequence[float] = (0, 0, 0, 0)) -> Paster:
    """The paste of a generated crop into `frame` under the lower-face mask (grown by `pads`, frame
    pixels: top, bottom, left, right)."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2])))) if any(pads) else 1.0  # crop px per frame px
    mask = lower_face_mask(transform_points(points, matrix), crop.shape[0], tuple(p * scale for p in pads))
    return Paster(frame, crop, matrix, mask, mode, colour_match)


def _paste_and_write(writer: media.VideoWriter, results, mode: str, colour_match: bool, summary: Summary,
                     step, pads: Sequence[float] = (0, 0, 0, 0)) -> None:
    """The one paste loop: results yield ((frame, transform, landmarks), crop, generated); frames
    with a generated crop get it pasted under the lower-face mask (grown by `pads`, frame pixels:
    top, bottom, left, right), the others pass through."""
    for (frame, matrix, points), crop, generated in results:
        if generated is not None:
            frame = _paster(frame, crop, matrix, points, mode, colour_match, pads)(generated)
            summary.faces += 1
        else:
            summary.passed_through += 1
        writer.write(frame)
        step(1)
    summary.frames = writer.frames_written


def blend_video(source: PathLike, cache_path: PathLike, crops_path: PathLike, output: PathLike,
                mode: str = "feather", audio_path: Optional[PathLike] = None, overwrite: bool = False,
                colour_match: bool = True, progress: Optional[ProgressHook] = None, crf: int = media.VIDEO_CRF) -> Summary:
    """Paste generated crops (a video or image folder of S×S crops, one per source frame) back into `source`.

    The crops must be cut as the cache's `transform_<kind><S>` describes (the kind is read from
    the cache: the one whose size matches the crops), and the cache must be `source`'s. Audio
    comes from `audio_path` or the source. Fewer crops than frames is an error; extra crops are
    ignored with a note.
    """
    started = time.perf_counter()
    check.choice("--mode", mode, BLEND_MODES)
    check.number("--crf", crf, *check.CRF_RANGE, what="H.264 quality, lower is better")
    if audio_path is not None:
        check.existing_file("--audio", audio_path)
    source = media.check_input(source)
    cache_path = media.check_input(cache_path)
    crops_path = Path(crops_path)
    if not crops_path.is_dir():
        crops_path = media.check_input(crops_path)
    output = check.output_file("-o", output, [source, cache_path, crops_path], overwrite)
    output = media.check_output(output, [source, cache_path, crops_path], overwrite)
    cache = load_cache(cache_path)
    info = media.probe(source)
    if info.is_image:
        image = media.read_image(source)
        info.width, info.height = image.shape[1], image.shape[0]
    _check_cache_matches(cache, cache_path, info)
    generated = _read_crops(crops_path)
    size = generated[0].shape[0] if isinstance(generated, list) else generated.size
    keys = [k[len("transform_"):] for k in cache if k.startswith("transform_") and k.endswith(str(size))]
    if not keys:
        held = sorted(k[len("transform_"):] for k in cache if k.startswith("transform_"))
        raise DubberError(f"crops are {size}x{size}, but the cache holds transforms for {', '.join(held) or 'no crop'}; "
                          f"preprocess with --crop KIND:{size}", cache_path)
    transforms = cache[f"transform_{keys[0]}"]
    landmarks = cache["landmarks"]
    n = len(transforms)
    count = len(generated) if isinstance(generated, list) else generated.estimated_frames
    if count < n - (0 if isinstance(generated, list) else 1):
        raise DubberError(f"holds {count} crops, but the source has {n} frames (one crop per frame is needed)",
                          crops_path)
    audio_source = audio_path or (source if info.has_audio else None)
    summary = Summary(output=Path(output), backbone="(blend)")
    if isinstance(generated, list) and count > n:
        summary.notes.append(f"{crops_path}: {count} crops for {n} frame{'s' if n > 1 else ''}; the last {count - n} are not used")
    frames = [image] * n if info.is_image else media.VideoReader(info)
    fps = float(cache["fps"])
    duration = n / fps

    def results():
        for t, (frame, crop) in enumerate(zip(frames, generated)):
            if t >= n:
                break
            matrix = transforms[t]
            original = None if np.isnan(matrix[0, 0]) else warp_crop(frame, matrix, size)
            yield (frame, matrix, landmarks[t]), original, None if original is None else crop

    with media.atomic_output(output) as tmp:
        with media.VideoWriter(tmp, fps, int(cache["width"]), int(cache["height"]), audio_source, duration,
                               crf) as writer:
            _paste_and_write(writer, results(), mode, colour_match, summary,
                             progress_step(progress, "blend", n))
        if summary.frames < n:
            short = "crops" if isinstance(generated, _CropVideo) and generated.frames_read < n else "source frames"
            where = crops_path if short == "crops" else source
            raise DubberError(f"only {summary.frames} {short} for the {n} frames of the cache (one per frame is "
                              "needed)", where)
    summary.seconds = time.perf_counter() - started
    return summary


def _check_cache_matches(cache, cache_path: Path, info: media.MediaInfo) -> None:
    """The cache describes `info`'s file: same frame size, frame rate and (for a video) frame count."""
    width, height = int(cache["width"]), int(cache["height"])
    n = len(cache["landmarks"])
    redo = f"run `dubber preprocess {info.path}` for it"
    if (width, height) != (info.width, info.height):
        raise DubberError(f"is the cache of a {width}x{height} input, but {info.path} is {info.width}x{info.height}; "
                          + redo, cache_path)
    if info.is_image and n != 1:
        raise DubberError(f"is the cache of a {n}-frame video, but {info.path} is a photo; " + redo, cache_path)
    if not info.is_image:
        if abs(float(cache["fps"]) - info.fps) > 0.01:
            raise DubberError(f"is the cache of a {float(cache['fps']):.4g} fps input, but {info.path} runs at "
                              f"{info.fps:.4g} fps; " + redo, cache_path)
        expected = int(round(info.duration * info.fps))
        if expected and abs(expected - n) > 1:
            raise DubberError(f"is the cache of a {n}-frame input, but {info.path} has about {expected} frames; "
                              + redo, cache_path)


class _CropVideo:
    """A video of square crops, streamed; `estimated_frames` from its duration."""

    def __init__(self, info: media.MediaInfo):
        self.info = info
        self.size = info.width
        self.estimated_frames = int(round(info.duration * info.fps))
        self.frames_read = 0

    def __iter__(self):
        reader = media.VideoReader(self.info)
        for frame in reader:
            self.frames_read = reader.frames_read
            yield frame


def _read_crops(path: Path):
    """Generated crops from a folder of images (sorted by name) or a video of square frames."""
    if path.is_dir():
        files = media.list_media(path, "face")
        if not files:
            raise DubberError("folder holds no crop images", path)
        crops = [media.read_image(f) for f in files]
        for f, crop in zip(files, crops):
            if crop.shape[0] != crop.shape[1] or crop.shape != crops[0].shape:
                raise DubberError(f"crops must all be square and of one size: {files[0].name} is "
                                  f"{crops[0].shape[1]}x{crops[0].shape[0]}, {f.name} {crop.shape[1]}x{crop.shape[0]}", path)
        return crops
    info = media.probe(path)
    if not info.has_video or info.width != info.height:
        raise DubberError("crops must be square frames (a video or a folder of images)", path)
    return _CropVideo(info)
