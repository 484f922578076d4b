"""A face input analysed: decode a photo or video once and track the chosen face through it.

The analysis is what `lipsync`, `preprocess` (the cache) and `eval` share: the media description,
the frame rate and the face track (landmarks per frame, NaN where no face).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from dubber import media
from dubber.errors import DubberError
from dubber.face.track import DETECT_EVERY, FaceTrack, track_faces

PathLike = Union[str, Path]
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
            info: Optional[media.MediaInfo] = None, first: int = 0, count: Optional[int] = None) -> Analysis:
    """Decode a photo or video once and track the chosen face through it (photo: at image_fps).

    info: the file's probe when the caller has it (one `ffmpeg -i` fewer); first / count: only
    that part of a video (source frames first .. first + count; count None: to the end).
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
    reader = media.VideoReader(info, start=first, count=count) if part else media.VideoReader(info)
    frames: List[np.ndarray] = []
    source = reader if not keep_frames else _keeping(reader, frames)
    track = track_faces(source, choice.detector, choice.detect_every, choice.face_index,
                        choice.face_box, on_frame=lambda t: step(1))
    if reader.frames_read == 0:
        raise DubberError(f"no video frame could be decoded from {first / info.fps:.3f} s on" if part else
                          "no video frame could be decoded (corrupt or truncated file)", info.path)
    if not track.valid.any():
        raise DubberError("no face found in any frame of the part asked for (--start/--duration)" if part else
                          "no face found in any frame", info.path)
    return Analysis(info, info.fps, track, frames=frames)


def _keeping(frames, kept: List[np.ndarray]):
    for frame in frames:
        kept.append(frame)
        yield frame
