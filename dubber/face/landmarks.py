"""dlib's 68-point shape predictor (iBUG 300-W layout: jaw 0-16, brows 17-26, nose 27-35,
eyes 36-47, mouth 48-67)."""

from functools import lru_cache

import numpy as np

from dubber.face.detect import model_file

# Index ranges of the iBUG layout: the one definition every module uses.
LOWER_JAW = slice(2, 15)  # jaw points from below the ears round the chin
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
NOSE_BRIDGE_LOW = 29  # lowest point of the nose bridge
NOSE_TIP = 30
MOUTH = slice(48, 68)  # outer lip 48-59, inner lip 60-67
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # upper / lower inner-lip points facing each other
# Of the 20 mouth points: the point each becomes in a left-right mirror image (48 <-> 54, 60 <-> 64, ...).
MOUTH_MIRROR = (6, 5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 16, 15, 14, 13, 12, 19, 18, 17)


@lru_cache(maxsize=None)
def _predictor():
    import dlib

    return dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))


def predict_landmarks(gray: np.ndarray, box: np.ndarray) -> np.ndarray:
    """68 landmarks of the face in `box`: gray uint8 [H, W], box (x0, y0, x1, y1) -> float32 [68, 2] (x, y) pixels."""
    import dlib

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    shape = _predictor()(gray, dlib.rectangle(x0, y0, x1, y1))
    return np.array([[p.x, p.y] for p in shape.parts()], np.float32)


def centred_mouth(mouth: np.ndarray) -> np.ndarray:
    """Mouth points [..., 20, 2] (dlib 48-67) about their centroid: the mouth's shape."""
    return mouth - mouth.mean(-2, keepdims=True)


def mouth_width(mouth: np.ndarray) -> float:
    """Corner-to-corner width (dlib 48 to 54) of mouth points [20, 2], in the points' units."""
    return float(np.linalg.norm(mouth[6] - mouth[0]))


def inner_opening(mouth: np.ndarray) -> np.ndarray:
    """Inner-lip opening of mouth points [..., 20, 2] (dlib 48-67): the mean distance of the facing
    inner-lip pairs, in the points' units -> [...]."""
    upper = mouth[..., [p - MOUTH.start for p, _ in INNER_LIP_PAIRS], :]
    lower = mouth[..., [q - MOUTH.start for _, q in INNER_LIP_PAIRS], :]
    return np.linalg.norm(upper - lower, axis=-1).mean(-1)


def mouth_aperture(landmarks68: np.ndarray) -> np.ndarray:
    """Scale-free inner-lip opening per frame: [N,68,2] dlib landmarks -> [N].

    Mean distance of the facing inner-lip pairs 61-67, 62-66, 63-65, divided by the inter-ocular
    distance (between the two eye centres: the mean of points 36-41 and of 42-47). The eyes, unlike
    the mouth width, do not move with speech. Closed mouth ~0, wide open ~0.3-0.5.
    """
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.ndim != 3 or points.shape[1:] != (68, 2):
        raise ValueError(f"expected landmarks [N,68,2], got shape {points.shape}")
    opening = inner_opening(points[:, MOUTH])
    eye_to_eye = points[:, LEFT_EYE].mean(axis=1) - points[:, RIGHT_EYE].mean(axis=1)
    inter_ocular = np.linalg.norm(eye_to_eye, axis=1)
    return opening / np.maximum(inter_ocular, 1e-6)
