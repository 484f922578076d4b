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


def detect_faces(frame_bgr: np.ndarray, kind: str = "hog") -> np.ndarray:
    """Faces in a frame: uint8 BGR [H, W, 3] -> float32 boxes [K, 4] (x0, y0, x1, y1) in frame pixels, largest first."""
    import cv2

    detector = _dlib_detector(kind)
    h, w = frame_bgr.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = cv2.resize(frame_bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else frame_bgr
    rgb = np.ascontiguousarray(small[:, :, ::-1])
    upsample = 1 if max(small.shape[:2]) < HOG_UPSAMPLE_BELOW else 0
    found = detector(rgb, upsample)
    rects = [getattr(d, "rect", d) for d in found]
    boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32).reshape(-1, 4) / scale
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[np.argsort(-areas)]
