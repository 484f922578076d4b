"""A face input analysed: decode a photo or video once and track the chosen face through it.

The analysis is what `lipsync`, `preprocess` (the cache) and `eval` share: the media description,
the frame rate and the face track (landmarks per frame, NaN where no face). `lipsync` tracks a
long video in two processes (`analyse(workers=2)`) and keeps each analysis by the input's content
(`analyse_stored`), so dubbing the same video again skips it.
"""

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from dubber import media
from dubber.errors import DubberError
from dubber.face.track import DETECT_EVERY, MATCH_IOU, FaceTrack, box_iou, track_faces

PathLike = Union[str, Path]
TRACK_VERSION = 1  # bump when tracking changes what it finds: stored analyses of older trackers are not used
STORE_ENTRIES = 256  # stored analyses kept (least recently used dropped); ~0.5 kB a frame each
# A video at least this long is tracked by two processes at once (analyse(workers=2)): the worker's
# start-up (imports, dlib's models) costs ~2 s of CPU, which a shorter one would not repay.
PARALLEL_MIN_FRAMES = 250
WORKER_SHARE = 0.45  # of the frames, the later part, tracked by the worker (it starts ~2 s late)
ANALYSIS_WORKERS = 2 if (os.cpu_count() or 1) > 1 else 1  # processes tracking a long video's face (lipsync, adapt)
ProgressHook = Callable[[str, int, Optional[int]], None]  # (stage, advance, total)


@dataclass(frozen=True)
class FaceChoice:
    """How the face to follow is found: detector, detection interval and which face."""

    detector: str = "hog"
    detect_every: int = DETECT_EVERY
    face_index: int = 0
    face_box: Optional[Tuple[float, float, float, float]] = None


@dataclass
class Analysis:
    """A face input analysed: its media description, frame rate and face track (N source frames).

    frames: the decoded frames (uint8 BGR), kept only when asked for (short clips, one decode).
    """

    info: media.MediaInfo
    fps: float
    track: FaceTrack
    image: Optional[np.ndarray] = None  # the decoded photo, for photo input
    frames: List[np.ndarray] = field(default_factory=list)

    @property
    def is_image(self) -> bool:
        return self.image is not None


def progress_step(progress: Optional[ProgressHook], stage: str, total: Optional[int]) -> Callable[[int], None]:
    """A callable advancing `stage` of a ProgressHook by n (a no-op without a hook)."""
    if progress is None:
        return lambda n=1: None
    progress(stage, 0, total)
    return lambda n=1: progress(stage, n, total)


def analyse(face_path: PathLike, choice: FaceChoice = FaceChoice(), image_fps: float = media.DEFAULT_IMAGE_FPS,
            progress: Optional[ProgressHook] = None, keep_frames: bool = False,
            info: Optional[media.MediaInfo] = None, first: int = 0, count: Optional[int] = None,
            workers: int = 1) -> Analysis:
    """Decode a photo or video once and track the chosen face through it (photo: at image_fps).

    info: the file's probe when the caller has it (one `ffmpeg -i` fewer); first / count: only
    that part of a video (source frames first .. first + count; count None: to the end).
    workers: 2 tracks a long video's later part in a second process meanwhile (dlib holds the
    GIL, so threads would not run at once); the parts are joined where the face continues, else
    the later part is tracked again from where the first left off.
    """
    info = info or media.probe(face_path)
    if info.is_image:
        image = media.read_image(info.path)
        info.width, info.height = image.shape[1], image.shape[0]
        track = track_faces([image], choice.detector, 1, choice.face_index, choice.face_box)
        if not track.valid.any():
            raise DubberError("no face found in the image", info.path)
        return Analysis(info, image_fps, track, image)
    if not info.has_video:
        raise DubberError("has no video stream (expected a photo or a video of a face)", info.path)
    part = bool(first) or count is not None
    expected = count or max(1, int(round(info.duration * info.fps)) - first)
    step = progress_step(progress, "detect faces", expected)
    frames: List[np.ndarray] = []
    if workers > 1 and not keep_frames and expected >= PARALLEL_MIN_FRAMES:
        track, frames_read = _track_in_two(info, choice, first, count, expected, step)
    else:
        reader = media.VideoReader(info, start=first, count=count) if part else media.VideoReader(info)
        source = reader if not keep_frames else _keeping(reader, frames)
        track = track_faces(source, choice.detector, choice.detect_every, choice.face_index,
                            choice.face_box, on_frame=lambda t: step(1))
        frames_read = reader.frames_read
    if frames_read == 0:
        raise DubberError(f"no video frame could be decoded from {first / info.fps:.3f} s on" if part else
                          "no video frame could be decoded (corrupt or truncated file)", info.path)
    if not track.valid.any():
        raise DubberError("no face found in any frame of the part asked for (--start/--duration)" if part else
                          "no face found in any frame", info.path)
    return Analysis(info, info.fps, track, frames=frames)


def _track_part(info: media.MediaInfo, choice: FaceChoice, start: int, count: Optional[int],
                face_box=None) -> Tuple[FaceTrack, int]:
    """Track frames start .. start + count of a video (a worker process's share): (track, frames read)."""
    reader = media.VideoReader(info, start=start, count=count)
    track = track_faces(reader, choice.detector, choice.detect_every, choice.face_index,
                        choice.face_box if face_box is None else face_box)
    return track, reader.frames_read


def _track_in_two(info: media.MediaInfo, choice: FaceChoice, first: int, count: Optional[int], expected: int,
                  step) -> Tuple[FaceTrack, int]:
    """Track the first part here while a spawned process tracks the rest; -> (joined track, frames read).

    The split falls on a detection frame of the one-process schedule, so both parts detect where it
    would. Where the parts disagree about the face at the split (another person chosen, say), the
    rest is tracked again here, starting on the face the first part ended with."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    split = int(expected * (1 - WORKER_SHARE)) // choice.detect_every * choice.detect_every
    rest = None if count is None else count - split
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        later = pool.submit(_track_part, info, choice, first + split, rest)
    except Exception:  # no child process here (a daemonic worker, a sandbox): the rest in this process
        pool = later = None
    tail = None
    try:
        reader = media.VideoReader(info, start=first, count=split)
        head = track_faces(reader, choice.detector, choice.detect_every, choice.face_index, choice.face_box,
                           on_frame=lambda t: step(1))
        if later is not None:
            try:
                tail, tail_read = later.result()
            except Exception:  # the worker failed (it could not start, say): the rest in this process
                tail = None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if reader.frames_read < split:  # the video ended before the split: nothing after it
        return head, reader.frames_read
    if tail is None or not _continues(head, tail):
        last = head.boxes[-1] if head.valid[-1] else None
        tail, tail_read = _track_part(info, choice, first + split, rest, face_box=last)
    step(len(tail))
    joined = FaceTrack(np.concatenate([head.landmarks, tail.landmarks]), np.concatenate([head.boxes, tail.boxes]),
                       head.width, head.height, max(head.faces_seen, tail.faces_seen))
    return joined, reader.frames_read + tail_read


def _continues(head: FaceTrack, tail: FaceTrack) -> bool:
    """Whether `tail` follows the face `head` ended on: their boxes at the split overlap as a track's
    do from frame to frame (or one side has no face there, where one process would detect afresh)."""
    if not len(tail) or not head.valid[-1] or not tail.valid[0]:
        return True
    return float(box_iou(head.boxes[-1:], tail.boxes[0])[0]) >= MATCH_IOU


def _keeping(frames, kept: List[np.ndarray]):
    for frame in frames:
        kept.append(frame)
        yield frame


def store_folder() -> Optional[Path]:
    """Where analyses are kept between runs: $DUBBER_CACHE_DIR/analysis, else
    $XDG_CACHE_HOME/dubber/analysis, else ~/.cache/dubber/analysis; None when DUBBER_CACHE_DIR is "off"."""
    root = os.environ.get("DUBBER_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "none", "0", ""):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dubber"
    return base / "analysis"


def content_key(path: PathLike, choice: FaceChoice, first: int, count: Optional[int], workers: int = 1) -> str:
    """sha256 of the file's bytes, the face choice, the part analysed, the tracker version and
    whether it was tracked in two parts (the join may differ from one pass by a frame's detection)."""
    key = (media.file_sha256(path), TRACK_VERSION, sorted(asdict(choice).items()), first, count, min(workers, 2))
    return hashlib.sha256(repr(key).encode()).hexdigest()


def analyse_stored(face_path: PathLike, choice: FaceChoice = FaceChoice(),
                   image_fps: float = media.DEFAULT_IMAGE_FPS, progress: Optional[ProgressHook] = None,
                   info: Optional[media.MediaInfo] = None, first: int = 0, count: Optional[int] = None,
                   folder: Optional[Path] = None, workers: int = 1) -> Analysis:
    """`analyse`, kept in `folder` (default `store_folder()`) under the input's content key: the
    second and later dubs of a video (another language, another voice) skip detection and
    landmarks. A stored analysis that cannot be read is analysed again; one that cannot be
    written is not an error (the dub does not need it)."""
    info = info or media.probe(face_path)
    folder = folder if folder is not None else store_folder()
    if folder is None:
        return analyse(face_path, choice, image_fps, progress, info=info, first=first, count=count, workers=workers)
    path = folder / f"{content_key(info.path, choice, first, count, workers)}.npz"
    stored = _load_stored(path, info, image_fps)
    if stored is not None:
        return stored
    analysis = analyse(face_path, choice, image_fps, progress, info=info, first=first, count=count, workers=workers)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        track = analysis.track
        with media.atomic_output(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, fps=analysis.fps, landmarks=track.landmarks, boxes=track.boxes, width=track.width,
                     height=track.height, faces_seen=track.faces_seen)
        _prune(folder)
    except OSError:
        pass
    return analysis


def _load_stored(path: Path, info: media.MediaInfo, image_fps: float) -> Optional[Analysis]:
    try:
        with np.load(path) as data:
            track = FaceTrack(data["landmarks"], data["boxes"], int(data["width"]), int(data["height"]),
                              int(data["faces_seen"]))
            fps = float(data["fps"])
        os.utime(path)  # recently used: kept by _prune
    except Exception:  # missing, truncated or from elsewhere: analyse again
        return None
    if info.is_image:
        image = media.read_image(info.path)
        info.width, info.height = image.shape[1], image.shape[0]
        return Analysis(info, image_fps, track, image)
    return Analysis(info, fps, track)


def _prune(folder: Path) -> None:
    """Keep the STORE_ENTRIES most recently used analyses."""
    entries = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[STORE_ENTRIES:]:
        old.unlink(missing_ok=True)
