"""dlib face detection (HOG by default, the CNN/MMOD detector as an option) on a downscaled frame.

Model files come from the `face_recognition_models` package, located without importing its
`__init__` (which needs the deprecated pkg_resources).
"""

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from dubber.errors import DubberError

DETECT_MAX_SIDE = 480  # px: frames are shrunk to this before detection (speed; faces stay > 40 px)
HOG_UPSAMPLE_BELOW = 400  # px: smaller frames are upsampled once so 40 px faces are still found
DETECTORS = ("hog", "cnn")
# Re-detection near a tracked face: a square region ROI_SCALE face sides wide, scaled so the face
# is about ROI_FACE_SIDE px -- what HOG's 80 px window finds without upsampling -- costs ~2-3 ms
# against ~40 ms for a full-frame pass on a 360x288 frame (upsampled to 720x576). The region is
# centred on the box the landmarks predicted from the previous frame, so its margin (a quarter of
# the face side) needs to cover one frame's motion; when it misses, the tracker searches the
# whole frame.
ROI_SCALE = 1.5  # region side / tracked face side
ROI_FACE_SIDE = 90  # px: the tracked face's side in the scaled region (within a pyramid step, 82-99)
PYRAMID_STEP = 6 / 5  # dlib scans an image pyramid, each level 5/6 of the one above (pyramid_down<6>)


def model_file(name: str) -> Path:
    """Path of a model shipped in face_recognition_models/models (e.g. shape_predictor_68_face_landmarks.dat)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DubberError("the face_recognition_models package is not installed (pip install face_recognition_models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise DubberError("dlib model file missing from face_recognition_models", path)
    return path


@lru_cache(maxsize=None)
def _dlib_detector(kind: str):
    import dlib

    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(str(model_file("mmod_human_face_detector.dat")))
    raise DubberError(f"unknown face detector {kind!r}; choose one of {', '.join(DETECTORS)}")


def _full_frame_scale(height: int, width: int):
    """(resize factor, dlib upsample count) of a full-frame detection: shrink large frames to
    DETECT_MAX_SIDE, upsample small ones once."""
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    upsample = 1 if max(round(height * scale), round(width * scale)) < HOG_UPSAMPLE_BELOW else 0
    return scale, upsample


def _detect(image_bgr: np.ndarray, scale: float, upsample: int, kind: str) -> np.ndarray:
    """Faces in `image_bgr` resized by `scale`, then searched with `upsample` dlib upsamplings:
    float32 boxes [K, 4] (x0, y0, x1, y1) in `image_bgr` pixels, largest first."""
    import cv2

    h, w = image_bgr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image_bgr if size == (w, h) else cv2.resize(
        image_bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rgb = np.ascontiguousarray(small[:, :, ::-1])
    found = _dlib_detector(kind)(rgb, upsample)
    rects = [getattr(d, "rect", d) for d in found]
    boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32).reshape(-1, 4)
    boxes /= np.array([size[0] / w, size[1] / h] * 2, np.float32)  # the rounded size's exact factors
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[np.argsort(-areas)]


def detect_faces(frame_bgr: np.ndarray, kind: str = "hog") -> np.ndarray:
    """Faces in a frame: uint8 BGR [H, W, 3] -> float32 boxes [K, 4] (x0, y0, x1, y1) in frame pixels, largest first."""
    return _detect(frame_bgr, *_full_frame_scale(*frame_bgr.shape[:2]), kind)


def detect_faces_near(frame_bgr: np.ndarray, box: np.ndarray, kind: str = "hog") -> np.ndarray:
    """Faces in the region around `box` (x0, y0, x1, y1), a face already tracked: float32 boxes
    [K, 4] in frame pixels, largest first; empty when the region misses.

    The region is scaled by the full-frame detector's scale times a whole power of PYRAMID_STEP,
    so its pyramid levels are the full frame's: a face is boxed at the same size either way.
    """
    h, w = frame_bgr.shape[:2]
    side = float(max(box[2] - box[0], box[3] - box[1]))
    if not np.isfinite(side) or side <= 0:
        return np.zeros((0, 4), np.float32)
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, ROI_SCALE * side / 2
    x0, y0 = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    x1, y1 = min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half)))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 4), np.float32)
    scale, upsample = _full_frame_scale(h, w)
    full = scale * 2 ** upsample
    levels = round(np.log(side * full / ROI_FACE_SIDE) / np.log(PYRAMID_STEP))
    boxes = _detect(frame_bgr[y0:y1, x0:x1], full / PYRAMID_STEP ** levels, 0, kind)
    return boxes + np.array([x0, y0, x0, y0], np.float32)
