"""The faces in a photo or video, listed before choosing one: `dubber faces VIDEO`.

Faces are detected on frames sampled every `every` seconds and linked from sample to sample by
overlap (a face that vanishes for longer than GAP_SECONDS and comes back is listed again, under a
new id). Ids follow first appearance, ties broken by size (largest first), so for the faces
visible from the first frame the id is also what `--face-index` counts. `lipsync --face ID`
dubs face ID: it starts the tracker on that face's box where the face first appears.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from dubber import media
from dubber.errors import DubberError

PathLike = Union[str, Path]
SAMPLE_SECONDS = 0.5  # default interval between the frames searched for faces
GAP_SECONDS = 2.0  # a face unseen for longer than this ends its entry
LINK_IOU = 0.2  # a detection continues an entry when it overlaps the entry's last box this much...
LINK_CENTRE = 0.5  # ...or its centre lies within this many face sides of the last box's centre
THUMB = 128  # px: preview thumbnail side


@dataclass
class Face:
    """One face: id, the time range it is seen in (seconds, end exclusive; a photo: 0, 0), its first
    and last frame, the samples it was found in, its box (x0, y0, x1, y1) in its first frame and
    its median side in pixels."""

    id: int
    start: float
    end: float
    first_frame: int
    last_frame: int
    samples: int
    box: Tuple[float, float, float, float]
    side: float
    _best: Optional[np.ndarray] = field(default=None, repr=False)  # thumbnail (BGR), internal
    _best_score: float = field(default=-1.0, repr=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("_best"), data.pop("_best_score")
        data["box"] = [round(float(v), 1) for v in self.box]
        data["start"], data["end"], data["side"] = round(self.start, 3), round(self.end, 3), round(self.side, 1)
        return data


@dataclass
class FaceList:
    path: Path
    is_image: bool
    fps: float
    frames: int  # frames decoded
    width: int
    height: int
    faces: List[Face]
    max_together: int = 0  # most faces found in one frame

    def as_dict(self) -> dict:
        return {"file": str(self.path), "is_image": self.is_image, "fps": self.fps, "frames": self.frames,
                "width": self.width, "height": self.height, "max_together": self.max_together,
                "faces": [f.as_dict() for f in self.faces]}


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return float(inter / max(area(a) + area(b) - inter, 1e-6))


def _linked(last: np.ndarray, box: np.ndarray) -> float:
    """A score > 0 when `box` continues a face last seen at `last` (higher is better)."""
    iou = box_iou(last, box)
    side = max(last[2] - last[0], last[3] - last[1])
    dist = np.hypot((last[0] + last[2] - box[0] - box[2]) / 2, (last[1] + last[3] - box[1] - box[3]) / 2)
    near = 1 - dist / (LINK_CENTRE * side) if side > 0 else 0
    return iou if iou >= LINK_IOU else (near * LINK_IOU if near > 0 else 0.0)


def _thumbnail(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = box
    side = 1.4 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = THUMB / side
    matrix = np.array([[scale, 0, THUMB / 2 - scale * cx], [0, scale, THUMB / 2 - scale * cy]], np.float32)
    return cv2.warpAffine(frame, matrix, (THUMB, THUMB), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT)


def list_faces(path: PathLike, detector: str = "hog", every: float = SAMPLE_SECONDS,
               progress: Optional[Callable[[str, int, Optional[int]], None]] = None) -> FaceList:
    """Detect and link the faces of a photo or video (see the module docstring).

    Faces are searched every `every` seconds; where one appears or vanishes between two samples,
    the frames in between (kept until the next sample) are searched near it, by bisection, so
    time ranges are exact to the frame."""
    from dubber.face.detect import detect_faces

    info = media.probe(path)
    if info.is_image:
        image = media.read_image(info.path)
        frames = iter([image])
        fps, step, total = media.DEFAULT_IMAGE_FPS, 1, 1
        height, width = image.shape[:2]
    else:
        if not info.has_video:
            raise DubberError("has no video stream (expected a photo or a video of a face)", info.path)
        fps, width, height = info.fps, info.width, info.height
        step = max(1, int(round(every * fps)))
        total = max(1, int(round(info.duration * fps)))
        frames = iter(media.VideoReader(info))
    gap = max(1, int(round(GAP_SECONDS * fps)))
    entries: List[dict] = []  # {"face": Face, "last": box, "open": bool, "sides": [...], "seen": sample}
    recent: List[Tuple[int, np.ndarray]] = []  # frames since the last sample
    decoded, max_together, previous = 0, 0, None
    if progress is not None:
        progress("find faces", 0, total)
    for t, frame in enumerate(frames):
        decoded += 1
        if progress is not None:
            progress("find faces", 1, total)
        if t % step:
            recent.append((t, frame))
            continue
        found = detect_faces(frame, detector)
        max_together = max(max_together, len(found))
        for entry in entries:
            if entry["open"] and t - entry["face"].last_frame > gap:
                entry["open"] = False
        taken, matched = set(), set()
        pairs = sorted(((_linked(e["last"], box), i, k) for i, e in enumerate(entries) if e["open"]
                        for k, box in enumerate(found)), reverse=True)
        for score, i, k in pairs:
            if score <= 0 or k in taken or i in matched:
                continue
            taken.add(k), matched.add(i)
            _update(entries[i], found[k], frame, t, fps)
        for i, entry in enumerate(entries):  # seen at the previous sample, gone now: when did it go?
            if i not in matched and entry["seen"] == previous:
                _refine_end(entry, recent, detector, fps)
        for k, box in enumerate(found):
            if k not in taken:
                face = Face(-1, t / fps, t / fps, t, t, 0, tuple(float(v) for v in box), 0.0)
                entry = {"face": face, "last": box, "open": True, "sides": [], "seen": None}
                _update(entry, box, frame, t, fps)
                if previous is not None:  # it arrived since the previous sample: when?
                    _refine_start(entry, recent, detector, fps)
                entries.append(entry)
        previous, recent = t, []
    if decoded == 0:
        raise DubberError("no video frame could be decoded (corrupt or truncated file)", info.path)
    for entry in entries:
        if entry["seen"] == previous:  # seen at the last sample: through the frames after it?
            _refine_end(entry, recent, detector, fps)
    entries.sort(key=lambda e: (e["face"].first_frame, -(e["face"].box[2] - e["face"].box[0])))
    faces = []
    for k, entry in enumerate(entries):
        face = entry["face"]
        face.id = k
        face.side = float(np.median(entry["sides"]))
        if info.is_image:
            face.start = face.end = 0.0
        else:
            face.start, face.end = face.first_frame / fps, (face.last_frame + 1) / fps
        faces.append(face)
    return FaceList(info.path, info.is_image, fps, decoded, width, height, faces, max_together)


def _near(frame: np.ndarray, box: np.ndarray, detector: str) -> Optional[np.ndarray]:
    """The face near `box` in `frame` (a detection that continues it), or None."""
    from dubber.face.detect import detect_faces_near

    found = detect_faces_near(frame, box, detector)
    scores = [_linked(box, b) for b in found]
    return found[int(np.argmax(scores))] if scores and max(scores) > 0 else None


def _refine_start(entry: dict, recent: List[Tuple[int, np.ndarray]], detector: str, fps: float) -> None:
    """The face of `entry` was first found at a sample; find the earliest of the `recent` frames before
    it that already shows it (bisection: absent, then present) and start the entry there."""
    face: Face = entry["face"]
    lo, hi, box = 0, len(recent), None  # present at index hi (len(recent): the sample itself)
    while lo < hi:
        mid = (lo + hi) // 2
        found = _near(recent[mid][1], np.asarray(face.box, np.float32), detector)
        if found is not None:
            hi, box = mid, found
        else:
            lo = mid + 1
    if hi < len(recent):
        face.first_frame, face.start = recent[hi][0], recent[hi][0] / fps
        face.box = tuple(float(v) for v in box)


def _refine_end(entry: dict, recent: List[Tuple[int, np.ndarray]], detector: str, fps: float) -> None:
    """The face of `entry` was last found at a sample; find the last of the `recent` frames after it
    that still shows it (bisection: present, then absent)."""
    face: Face = entry["face"]
    lo, hi = -1, len(recent) - 1  # present at index lo (-1: the sample where it was last found)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _near(recent[mid][1], entry["last"], detector) is not None:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 0:
        face.last_frame, face.end = recent[lo][0], recent[lo][0] / fps


def _update(entry: dict, box: np.ndarray, frame: np.ndarray, t: int, fps: float) -> None:
    face: Face = entry["face"]
    face.last_frame, face.end = t, t / fps
    face.samples += 1
    entry["last"], entry["seen"] = box, t
    side = float(max(box[2] - box[0], box[3] - box[1]))
    entry["sides"].append(side)
    if side > face._best_score:  # the preview shows the face where it is largest
        face._best_score, face._best = side, _thumbnail(frame, box)


def format_time(seconds: float) -> str:
    minutes, sec = divmod(seconds, 60)
    return f"{int(minutes)}:{sec:06.3f}"


def preview_image(listing: FaceList) -> np.ndarray:
    """One row of labelled thumbnails, one per face (uint8 BGR); a grey tile when there is none."""
    import cv2

    tiles = []
    for face in listing.faces:
        tile = face._best.copy() if face._best is not None else np.zeros((THUMB, THUMB, 3), np.uint8)
        label = f"{face.id}" if listing.is_image else f"{face.id}: {face.start:.1f}-{face.end:.1f}s"
        cv2.rectangle(tile, (0, 0), (THUMB - 1, 16), (0, 0, 0), -1)
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        tiles = [np.full((THUMB, THUMB, 3), 64, np.uint8)]
    return np.hstack(tiles)


def find(listing: FaceList, face_id: int) -> Face:
    """Face `face_id` of a listing, or an OptionError saying which ids there are."""
    from dubber.options import OptionError

    for face in listing.faces:
        if face.id == face_id:
            return face
    raise OptionError("--face", face_id, f"{listing.path} has {_count(listing)}; `dubber faces {listing.path}` "
                                         "lists them")


def _count(listing: FaceList) -> str:
    n = len(listing.faces)
    if n == 0:
        return "no face"
    return f"{n} face{'s' if n > 1 else ''} (id{'s 0-' + str(n - 1) if n > 1 else ' 0'})"


def selection_error(path: PathLike, detector: str, face_index: int,
                    face_box: Optional[Sequence[float]]) -> DubberError:
    """The error for a --face-index / --face-box that selects no face in `path` (an OptionError
    saying how many faces there are and where, or the plain 'no face found' when there is none)."""
    from dubber.options import OptionError, show

    info = media.probe(path)
    every = SAMPLE_SECONDS if info.is_image else max(SAMPLE_SECONDS, info.duration / 20)
    listing = list_faces(path, detector, every)
    if not listing.faces:
        return DubberError("no face found" + (" in the image" if listing.is_image else " in any frame"), path)
    if face_box is not None:
        boxes = "; ".join(f"{f.id}: {','.join(str(int(round(v))) for v in f.box)}" for f in listing.faces[:6])
        return OptionError("--face-box", ",".join(show(v) for v in face_box),
                           f"overlaps no face in {Path(path).name}; faces found at {boxes}")
    together = listing.max_together
    if together == 1:
        found = "one face" + ("" if listing.is_image else " at a time") + " (--face-index 0)"
    else:
        found = (f"{together} faces" if listing.is_image else f"at most {together} faces at a time") + \
                f" (--face-index 0 to {together - 1}, 0 = largest)"
    return OptionError("--face-index", face_index, f"{Path(path).name} has {found}; `dubber faces {path}` lists them")
