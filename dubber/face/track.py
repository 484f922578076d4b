"""Follow one face through a video: detect every few frames, track with landmarks in between.

Re-detections look in a region around the tracked face first (dubber.face.detect.detect_faces_near,
a fraction of a full-frame pass) and search the whole frame only when nothing is tracked or the
region holds no continuation of the track.

The face is chosen once (largest, or by --face-index / --face-box) and then followed by overlap,
so it is a track rather than a per-frame guess. Frames where it is not found get NaN landmarks
and are passed through unchanged by the pipeline.
"""

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from dubber.face.detect import detect_faces, detect_faces_near
from dubber.face.landmarks import predict_landmarks

DETECT_EVERY = 5  # frames between re-detections; landmarks track the face in between
MATCH_IOU = 0.3  # a detection continues the track when it overlaps the tracked box this much
SCENE_CHANGE = 40.0  # mean abs grey difference inside the face box that forces a re-detection


@dataclass
class FaceTrack:
    """Per-frame face geometry of one video. N frames.

    landmarks: float32 [N, 68, 2] frame pixels, NaN where no face.  boxes: float32 [N, 4]
    detector-style boxes (x0, y0, x1, y1), NaN where no face.  faces_seen: max faces in one
    full-frame detection (re-detections near the tracked face do not count the others).
    """

    landmarks: np.ndarray
    boxes: np.ndarray
    width: int
    height: int
    faces_seen: int = 0

    @property
    def valid(self) -> np.ndarray:
        return ~np.isnan(self.landmarks[:, 0, 0])

    def __len__(self) -> int:
        return len(self.landmarks)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [K, 4] with one box b [4] -> [K]."""
    x0 = np.maximum(a[:, 0], b[0]); y0 = np.maximum(a[:, 1], b[1])
    x1 = np.minimum(a[:, 2], b[2]); y1 = np.minimum(a[:, 3], b[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    return inter / np.maximum(area(a) + area(b) - inter, 1e-6)


def _bbox(points: np.ndarray) -> np.ndarray:
    return np.array([*points.min(0), *points.max(0)], np.float32)


def _to_unit(box: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Express `box` in the coordinates of `frame` (a box): (0,0)-(1,1) is the frame box."""
    w, h = frame[2] - frame[0], frame[3] - frame[1]
    return (box - np.tile(frame[:2], 2)) / np.array([w, h, w, h], np.float32)


def _from_unit(unit: np.ndarray, frame: np.ndarray) -> np.ndarray:
    w, h = frame[2] - frame[0], frame[3] - frame[1]
    return unit * np.array([w, h, w, h], np.float32) + np.tile(frame[:2], 2)


def _continuation(found: np.ndarray, box: np.ndarray) -> Optional[np.ndarray]:
    """The detection [4] among `found` [K, 4] that continues the track at `box`, or None."""
    overlaps = box_iou(found, box) if len(found) else np.zeros(0)
    return found[int(np.argmax(overlaps))] if len(found) and overlaps.max() >= MATCH_IOU else None


def track_faces(frames: Iterable[np.ndarray], detector: str = "hog", detect_every: int = DETECT_EVERY,
                face_index: int = 0, face_box: Optional[Sequence[float]] = None,
                on_frame: Optional[Callable[[int], None]] = None) -> FaceTrack:
    """Landmarks of the chosen face in every frame: frames uint8 BGR [H, W, 3] -> FaceTrack."""
    import cv2

    landmarks, boxes = [], []
    box = None  # detector-style box of the tracked face in the previous frame
    det_in_lm = None  # the detector box expressed relative to the landmarks' bounding box
    prev_gray = None
    faces_seen = 0
    width = height = 0
    for t, frame in enumerate(frames):
        height, width = frame.shape[:2]
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        detect_now = box is None or t % detect_every == 0
        if box is not None and prev_gray is not None and not detect_now:
            x0, y0, x1, y1 = np.clip(box, 0, [width, height, width, height]).astype(int)
            if x1 > x0 and y1 > y0:
                change = np.abs(gray[y0:y1, x0:x1].astype(np.int16) - prev_gray[y0:y1, x0:x1]).mean()
                detect_now = change > SCENE_CHANGE
        if detect_now and box is not None:
            # Re-detection: first in a region around the tracked face (cheap), the whole frame only
            # when the region holds no continuation of the track.
            redetected = _continuation(detect_faces_near(frame, box, detector), box)
            if redetected is None:
                found = detect_faces(frame, detector)
                faces_seen = max(faces_seen, len(found))
                redetected = _continuation(found, box)
            box = redetected
            det_in_lm = None
        elif detect_now:
            found = detect_faces(frame, detector)
            faces_seen = max(faces_seen, len(found))
            if len(found):
                if face_box is not None:
                    chosen = found[int(np.argmax(box_iou(found, np.asarray(face_box, np.float32))))]
                    box = chosen if box_iou(chosen[None], np.asarray(face_box, np.float32))[0] > 0 else None
                else:
                    box = found[face_index] if face_index < len(found) else None
            det_in_lm = None
        if box is None:
            landmarks.append(np.full((68, 2), np.nan, np.float32))
            boxes.append(np.full(4, np.nan, np.float32))
        else:
            points = predict_landmarks(gray, box)
            if det_in_lm is None:
                det_in_lm = _to_unit(box, _bbox(points))
            landmarks.append(points)
            boxes.append(box.astype(np.float32))
            box = _from_unit(det_in_lm, _bbox(points))  # where the detector would put it next frame
        prev_gray = gray
        if on_frame is not None:
            on_frame(t)
    if not landmarks:
        return FaceTrack(np.zeros((0, 68, 2), np.float32), np.zeros((0, 4), np.float32), width, height)
    return FaceTrack(np.stack(landmarks), np.stack(boxes), width, height, faces_seen)
