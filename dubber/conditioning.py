"""How a backbone's identity image is chosen (its declared `conditioning`, dubber.backbones.base).

Never the frame being generated: its mouth speaks the original words, and a model shown it mouths
them along with the new speech. One frame per video, because an identity that changes makes the
mouth jump.
"""

import numpy as np

from dubber.backbones.base import CONDITION_CLOSED_MOUTH, CONDITION_FIRST_FACE, CONDITION_NONE
from dubber.face.align import transform_points
from dubber.face.landmarks import mouth_aperture

IDENTITY_SEARCH_FRAMES = 250  # the identity frame is chosen among the first faces (10 s at 25 fps)


def closed_mouth_frame(landmarks: np.ndarray, transforms: np.ndarray) -> int:
    """The most closed mouth among the half of the first IDENTITY_SEARCH_FRAMES faces that sit
    nearest the typical pose in the crop, so a turned head or a bad landmark fit is not chosen.

    landmarks [N, 68, 2], crop transforms [N, 2, 3] (NaN where no face) -> source frame index.
    """
    candidates = np.flatnonzero(~np.isnan(transforms[:, 0, 0]))[:IDENTITY_SEARCH_FRAMES]
    points = np.stack([transform_points(landmarks[i], transforms[i]) for i in candidates])
    spread = np.abs(points - np.median(points, axis=0)).mean(axis=(1, 2))
    typical = candidates[spread <= np.median(spread)]
    return int(typical[np.argmin(mouth_aperture(landmarks[typical]))])


def first_face_frame(landmarks: np.ndarray, transforms: np.ndarray) -> int:
    """The first frame with a face (a photo's only frame)."""
    return int(np.flatnonzero(~np.isnan(transforms[:, 0, 0]))[0])


STRATEGIES = {CONDITION_CLOSED_MOUTH: closed_mouth_frame, CONDITION_FIRST_FACE: first_face_frame}


def identity_frame(strategy: str, landmarks: np.ndarray, transforms: np.ndarray):
    """Source frame index of the identity image under `strategy`, or None for CONDITION_NONE."""
    if strategy == CONDITION_NONE:
        return None
    return STRATEGIES[strategy](landmarks, transforms)
