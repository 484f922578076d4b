"""dlib's 68-point shape predictor (iBUG 300-W layout: jaw 0-16, brows 17-26, nose 27-35,
eyes 36-47, mouth 48-67)."""

from functools import lru_cache

import numpy as np

from dubber.face.detect import model_file


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
