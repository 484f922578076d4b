"""`dubber check VIDEO [SPEECH]`: does the mouth in a video follow its speech, and how far off is it?

Any video will do: a dubber output or another tool's. The face is tracked as `lipsync` tracks it
(dubber.analysis), cut into the sync expert's mouth crops (eval.sync.mouth_crops) and scored
against the speech -- SPEECH when given, else the video's own audio track, both placed on the
picture's timeline as a player sounds them -- with the expert's offset search
(eval.sync.offset_distances, metrics.lse), over the whole clip and per second.

Only 5-frame windows whose frames all show the face and whose middle frame has speech
(audio.speech_frames) are counted, each against the audio up to OFFSET_RANGE frames either way
where that audio has speech (voiced_pairs): in a pause no offset is more right than another, and
a closed mouth matches any pause. Figures:

  offset      frames the sound is off from where it best matches the mouth, the sign of every lag in
              dubber: positive = the mouth moves after the sound (audio early), negative = the
              mouth moves first (audio late; ffmpeg -itsoffset 0.3 on the audio: -7.5 at 25 fps).
  confidence  LSE-C at that offset: median minus minimum of the window-averaged distance curve
              (syncnet_python's "conf", Wav2Lip's LSE-C); about 0 when the mouth does not follow.
  lse_d       LSE-D, the curve's minimum (lower is closer); lse_c0 / lse_d0: both at offset 0.

The thresholds below were calibrated on real clips against the same clips with the audio shifted
by 0.3 s and against still frames (bench/calibrate_check.py; the figures are in README.md). They
hold for the expert they were measured with, weights/syncnet.pt (EXPERT_SHA256): another expert
file gives other figures and needs its own calibration (the report names the file it used).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from dubber import audio, media
from dubber.analysis import FaceChoice, ProgressHook, analyse, progress_step
from dubber.backbones.syncnet import MOUTH_FRAMES, OFFSET_RANGE
from dubber.errors import DubberError
from dubber.eval.metrics import lse
from dubber.eval.sync import frame_audio, mouth_crops, offset_distances

PathLike = Union[str, Path]

CHECK_VERSION = 1  # bumped whenever a rule or threshold below changes what a file scores
EXPERT_SHA256 = "97f022f10f736cc529e63597e69a7772393bbbdd0271c2375fd58ccba7c7205f"  # weights/syncnet.pt, calibrated on

SEGMENT_SECONDS = 1.0  # one row of the per-second table; a last part shorter than half of it joins the one before
MIN_FACE_FRACTION = 0.5  # a second with the face in fewer of its frames is flagged "no face"
MIN_SEGMENT_WINDOWS = 8  # scored windows a second needs (a third of it at 25 fps), else "no speech" / "no face"
MIN_CLIP_WINDOWS = 12  # scored windows (half a second of speech at 25 fps) before the clip gets a verdict
# An offset column is scored only when at least this fraction of the windows reach it (the rest
# would need audio before the clip's start or after its end): near the ends of the search a few
# windows' mean dips by chance (weights/README.md, offsets.csv).
MIN_COLUMN_COVERAGE = 0.5
# The mouth follows the speech when the confidence over W windows is at least
# max(CONFIDENCE_FLOOR, CONFIDENCE_SCALE / sqrt(W)), else "no lip sync" ("no sync" for a second).
# A still face's curve has no dip, only noise, and the minimum of a noisy curve lies below its
# median by about noise / sqrt(W): over 160 real clips made still, confidence * sqrt(W) stayed
# under 0.5 for 95 % of them (GRID 97 %, wild 95 %); real GRID clips reach 2.5-5, real wild ones
# 0.2-2.4 (the expert is weak on unseen faces). Long clips: never below the floor.
CONFIDENCE_SCALE = 0.5
CONFIDENCE_FLOOR = 0.05
# In sync within ITU-R BT.1359-1's thresholds of detectability: sound up to 45 ms before the picture,
# up to 125 ms after it (a late sound is the natural one: light outruns it). Never tighter than one
# frame either way, the expert's resolution.
AUDIO_EARLY_TOLERANCE = 0.045  # seconds
AUDIO_LATE_TOLERANCE = 0.125  # seconds

# Per-second flags, worst first.
NO_FACE, NO_SPEECH, NO_SYNC, OFFSET, OK = "no face", "no speech", "no sync", "offset", "ok"
# Verdicts.
IN_SYNC, OUT_OF_SYNC, NOT_SYNCED, NO_FACE_VERDICT, NO_SPEECH_VERDICT = (
    "in_sync", "out_of_sync", "no_sync", "no_face", "no_speech")


@dataclass
class Figures:
    """The expert's figures over some windows (None when there are too few to score)."""

    windows: int  # windows scored
    offset: Optional[int] = None  # frames; positive = audio early, negative = audio late
    offset_seconds: Optional[float] = None
    confidence: Optional[float] = None  # LSE-C at the offset
    lse_d: Optional[float] = None
    lse_c0: Optional[float] = None  # at offset 0
    lse_d0: Optional[float] = None
    needed: Optional[float] = None  # the confidence these many windows need (needed_confidence)


@dataclass
class Segment:
    """One second (SEGMENT_SECONDS) of the clip: frames [first, stop), what was found, the figures, a flag."""

    start: float  # seconds
    end: float
    first: int  # frames
    stop: int
    face: float  # fraction of its frames with the face found
    speech: float  # fraction of its frames with speech
    figures: Figures
    flag: str = OK


@dataclass
class SyncReport:
    """`dubber check`'s result: the whole clip's figures, one Segment per second and the verdict."""

    video: Path
    speech: Optional[Path]  # None: the video's own audio
    fps: float
    frames: int
    face: float  # fraction of frames with the face found
    speech_fraction: float  # fraction of frames with speech
    clip: Figures
    segments: List[Segment]
    verdict: str
    verdict_text: str
    expert: Path
    expert_sha256: str
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready, floats rounded to 4 decimals (what `--json` prints)."""
        def rounded(value):
            if isinstance(value, float):
                return round(value, 4)
            if isinstance(value, dict):
                return {k: rounded(v) for k, v in value.items()}
            if isinstance(value, list):
                return [rounded(v) for v in value]
            return value

        return rounded({
            "check_version": CHECK_VERSION, "video": str(self.video),
            "speech": str(self.speech) if self.speech is not None else None,
            "fps": self.fps, "frames": self.frames, "seconds": self.frames / self.fps,
            "face": self.face, "speech_fraction": self.speech_fraction,
            "verdict": self.verdict, "verdict_text": self.verdict_text, "clip": asdict(self.clip),
            "segments": [asdict(s) for s in self.segments],
            "expert": {"file": str(self.expert), "sha256": self.expert_sha256,
                       "calibrated": self.expert_sha256 == EXPERT_SHA256},
            "thresholds": thresholds(), "notes": list(self.notes)})


def thresholds() -> dict:
    return {"offset_range": OFFSET_RANGE, "segment_seconds": SEGMENT_SECONDS, "min_face_fraction": MIN_FACE_FRACTION,
            "min_segment_windows": MIN_SEGMENT_WINDOWS, "min_clip_windows": MIN_CLIP_WINDOWS,
            "confidence_scale": CONFIDENCE_SCALE, "confidence_floor": CONFIDENCE_FLOOR,
            "audio_early_tolerance": AUDIO_EARLY_TOLERANCE, "audio_late_tolerance": AUDIO_LATE_TOLERANCE}


# ---------------------------------------------------------------------------------------------
# the rules (arrays in, no model)


def window_rows(face: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """Windows to score: face, speech bool [T] -> bool [T - 4]: all 5 frames show the face and the
    middle one has speech."""
    face, speech = np.asarray(face, bool), np.asarray(speech, bool)
    windows = len(face) - MOUTH_FRAMES + 1
    if windows <= 0:
        return np.zeros(0, bool)
    whole = np.all([face[k:k + windows] for k in range(MOUTH_FRAMES)], axis=0)
    return whole & speech[MOUTH_FRAMES // 2:MOUTH_FRAMES // 2 + windows]


def voiced_pairs(distances: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """distances [W, O] with NaN wherever the audio it compares has no speech (and outside the clip).

    A closed mouth matches silence: a still face would otherwise "find" the offset that puts a
    pause under it, and a real one gain confidence from its pauses. Column o holds audio frame
    w + 2 + (o - O // 2) of window w (eval.sync.offset_distances).
    """
    distances = np.array(distances, np.float64)
    speech = np.asarray(speech, bool)
    windows, columns = distances.shape
    index = np.arange(windows)[:, None] + MOUTH_FRAMES // 2 + np.arange(columns)[None, :] - columns // 2
    inside = (index >= 0) & (index < len(speech))
    distances[~(inside & speech[np.clip(index, 0, len(speech) - 1)])] = np.nan
    return distances


def measure(distances: np.ndarray, rows: np.ndarray, fps: float, min_windows: int) -> Figures:
    """Figures of the chosen rows (bool [W]) of a distance matrix [W, O] (eval.sync.offset_distances)."""
    chosen = np.asarray(distances, np.float64)[np.asarray(rows, bool)]
    if len(chosen) < max(1, min_windows):
        return Figures(len(chosen))
    coverage = np.mean(np.isfinite(chosen), axis=0)
    chosen = np.where(coverage[None, :] >= MIN_COLUMN_COVERAGE, chosen, np.nan)
    scores = lse(chosen)
    offset = int(scores["offset"])
    return Figures(len(chosen), offset, offset / fps, scores["lse_c"], scores["lse_d"], scores["lse_c0"],
                   scores["lse_d0"], needed_confidence(len(chosen)))


def needed_confidence(windows: int) -> float:
    """The confidence over `windows` scored windows above which the mouth follows the speech."""
    return max(CONFIDENCE_FLOOR, CONFIDENCE_SCALE / float(np.sqrt(max(windows, 1))))


def follows(figures: Figures) -> bool:
    """Whether scored figures say the mouth follows the speech: confident enough, and the best
    offset inside the search, not on its edge (+-OFFSET_RANGE), where a still face's chance dips
    go and beyond which a real match may lie."""
    return (figures.offset is not None and figures.confidence >= figures.needed
            and abs(figures.offset) < OFFSET_RANGE)


def in_tolerance(offset: int, fps: float) -> bool:
    """An offset (frames; negative = audio late) within what nobody notices (AUDIO_*_TOLERANCE, at
    least one frame either way)."""
    frame = 1.0 / fps
    return -max(AUDIO_LATE_TOLERANCE, frame) - 1e-9 <= offset / fps <= max(AUDIO_EARLY_TOLERANCE, frame) + 1e-9


def segment_bounds(frames: int, fps: float, seconds: float = SEGMENT_SECONDS) -> List[Tuple[int, int]]:
    """[first, stop) frames of each segment; a last part under half a segment joins the one before."""
    step = seconds * fps
    count = max(1, int(np.ceil(frames / step - 1e-9)))
    edges = [min(frames, int(round(k * step))) for k in range(count)] + [frames]
    bounds = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < step / 2:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def segment_flag(face: float, speech_windows: int, figures: Figures, fps: float) -> str:
    """The flag of one segment: its face fraction, windows with speech (face or not) and figures."""
    if face < MIN_FACE_FRACTION:
        return NO_FACE
    if figures.offset is None:
        return NO_SPEECH if speech_windows < MIN_SEGMENT_WINDOWS else NO_FACE
    if not follows(figures):
        return NO_SYNC
    return OK if in_tolerance(figures.offset, fps) else OFFSET


def segments(distances: np.ndarray, face: np.ndarray, speech: np.ndarray, fps: float,
             seconds: float = SEGMENT_SECONDS) -> List[Segment]:
    """Per-segment figures and flags: distances [T - 4, O], face and speech bool [T]. A window
    belongs to the segment of its middle frame."""
    face, speech = np.asarray(face, bool), np.asarray(speech, bool)
    rows = window_rows(face, speech)
    voiced = speech[MOUTH_FRAMES // 2:MOUTH_FRAMES // 2 + len(rows)]
    middle = np.arange(len(rows)) + MOUTH_FRAMES // 2
    out = []
    for first, stop in segment_bounds(len(face), fps, seconds):
        inside = (middle >= first) & (middle < stop)
        figures = measure(distances, rows & inside, fps, MIN_SEGMENT_WINDOWS)
        share = float(np.mean(face[first:stop]))
        segment = Segment(first / fps, stop / fps, first, stop, share, float(np.mean(speech[first:stop])), figures)
        segment.flag = segment_flag(share, int(np.sum(voiced & inside)), figures, fps)
        out.append(segment)
    return out


def describe_offset(offset: int, fps: float) -> str:
    """'audio 0.32 s late (-8 frames)', 'audio 0.04 s early (+1 frame)', 'no offset (0 frames)'."""
    if offset == 0:
        return "no offset (0 frames)"
    return (f"audio {abs(offset) / fps:.2f} s {'late' if offset < 0 else 'early'} "
            f"({offset:+d} frame{'s' if abs(offset) > 1 else ''})")


def verdict(clip: Figures, face: float, speech_windows: int, fps: float,
            parts: List[Segment] = ()) -> Tuple[str, str]:
    """(code, one line) for the clip: clip figures, face fraction, windows with speech (face or
    not), and the segments (their flags are counted in the line)."""
    if clip.offset is None:
        if speech_windows >= MIN_CLIP_WINDOWS or face < MIN_FACE_FRACTION:
            return NO_FACE_VERDICT, (f"cannot judge: the face was found in {face:.0%} of the frames, "
                                     f"too few of them with speech ({clip.windows} windows, {MIN_CLIP_WINDOWS} needed)")
        return NO_SPEECH_VERDICT, (f"cannot judge: too little speech ({speech_windows} windows with speech, "
                                   f"{MIN_CLIP_WINDOWS} needed)")
    flagged = [s for s in parts if s.flag != OK]
    tail = f"; {len(flagged)} of {len(parts)} seconds flagged" if flagged else ""
    figures = f"confidence {clip.confidence:.3f}"
    if clip.confidence < clip.needed:
        return NOT_SYNCED, (f"no lip sync: the mouth does not follow this speech ({figures}, "
                            f"{clip.needed:.3f} needed over {clip.windows} windows){tail}")
    if not follows(clip):
        return NOT_SYNCED, (f"no lip sync within {OFFSET_RANGE / fps:.2f} s either way: the best match is on the "
                            f"edge of the search ({clip.offset:+d} frames, {figures}){tail}")
    if not in_tolerance(clip.offset, fps):
        return OUT_OF_SYNC, f"out of sync: {describe_offset(clip.offset, fps)}, {figures}{tail}"
    return IN_SYNC, f"in sync: {describe_offset(clip.offset, fps)}, {figures}{tail}"


def score(expert, mouths: np.ndarray, face: np.ndarray, mels: np.ndarray, speech: np.ndarray,
          fps: float) -> Tuple[Figures, List[Segment], str, str]:
    """The check on the expert's inputs: mouths uint8 [T, 48, 96, 3], face bool [T], mels
    [T, 80, 16], speech bool [T] -> (clip figures, segments, verdict code, verdict line)."""
    face, speech = np.asarray(face, bool), np.asarray(speech, bool)
    if len(face) < MOUTH_FRAMES:
        return Figures(0), [], NO_SPEECH_VERDICT, f"cannot judge: under {MOUTH_FRAMES} frames"
    distances = offset_distances(expert, mouths, mels)
    return judge(distances, face, speech, fps)


def judge(distances: np.ndarray, face: np.ndarray, speech: np.ndarray,
          fps: float) -> Tuple[Figures, List[Segment], str, str]:
    """`score` from the distance matrix [T - 4, O] on."""
    distances = voiced_pairs(distances, speech)
    rows = window_rows(face, speech)
    clip = measure(distances, rows, fps, MIN_CLIP_WINDOWS)
    parts = segments(distances, face, speech, fps)
    speech_windows = int(np.sum(speech[MOUTH_FRAMES // 2:MOUTH_FRAMES // 2 + len(rows)]))
    code, line = verdict(clip, float(np.mean(face)), speech_windows, fps, parts)
    return clip, parts, code, line


# ---------------------------------------------------------------------------------------------
# files


def check_sync(video: PathLike, speech: Optional[PathLike] = None, expert_path: Optional[PathLike] = None,
               device: str = "auto", choice: FaceChoice = FaceChoice(),
               progress: Optional[ProgressHook] = None) -> SyncReport:
    """Check VIDEO's mouth against SPEECH (default: its own audio track): see the module docstring.

    Raises DubberError for a file that is not a video, has no audio to check against, or shows
    no face; a face lost in parts is flagged, not an error.
    """
    from dubber.backbones import weights_path
    from dubber.cache import KEEP_FRAMES_BYTES
    from dubber.eval.run import load_sync_expert
    from dubber.options import resolved_device

    info = media.probe(video)
    if info.is_image:
        raise DubberError("is a photo; sync is checked on a video", info.path)
    if not info.has_video:
        raise DubberError("has no video stream (expected a video of a face)", info.path)
    if speech is None and not info.has_audio:
        raise DubberError("has no audio track: give the SPEECH to check it against", info.path)
    speech_path = media.check_input(speech) if speech is not None else info.path
    expert_file = Path(expert_path) if expert_path is not None else weights_path("syncnet")
    expert = load_sync_expert(expert_file).to(resolved_device(device))
    wav = audio.load_audio(speech_path, video_timeline=True)

    frame_count = round(info.duration * info.fps)
    keep = 0 < frame_count * info.width * info.height * 3 <= KEEP_FRAMES_BYTES  # else decode twice
    analysis = analyse(info.path, choice, progress=progress, keep_frames=keep, info=info)
    track, fps = analysis.track, analysis.fps
    frames = len(track)
    notes = []
    speech_seconds, video_seconds = len(wav) / audio.SAMPLE_RATE, frames / fps
    if speech_seconds < video_seconds - 1 / fps:
        notes.append(f"the speech ends at {speech_seconds:.2f} s, the video at {video_seconds:.2f} s: "
                     "the rest is judged as silence")
    elif speech is not None and speech_seconds > video_seconds + 1 / fps:
        notes.append(f"the speech lasts {speech_seconds:.2f} s, the video {video_seconds:.2f} s: "
                     "judged over the video's length")
    step = progress_step(progress, "mouth crops", frames)
    mouths = mouth_crops(analysis.frames or media.VideoReader(analysis.info), track.landmarks,
                         on_frame=lambda t: step(1))
    analysis.frames.clear()
    mels, _, voiced = frame_audio(wav, frames, fps)
    step = progress_step(progress, "sync expert", 1)
    clip, parts, code, line = score(expert, mouths, track.valid, mels, voiced, fps)
    step(1)
    sha = media.file_sha256(expert_file)
    if sha != EXPERT_SHA256:
        notes.append(f"the expert {expert_file} is not the file the thresholds were calibrated on "
                     f"(sha256 {EXPERT_SHA256[:12]}...): the figures stand, the verdict may not")
    return SyncReport(info.path, Path(speech) if speech is not None else None, fps, frames,
                      float(np.mean(track.valid)), float(np.mean(voiced)), clip, parts, code, line,
                      expert_file, sha, notes)
