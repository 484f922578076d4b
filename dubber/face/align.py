"""RSA-style alignment: one similarity transform per frame from stable landmarks to a template.

Eye centres and the nose tip barely move when a person speaks, so a least-squares similarity
(rotation, uniform scale, translation) onto fixed template positions puts every face in the same
place without distorting the mouth. The transform parameters are smoothed over time so crops do
not jitter; the inverse transform is what blending uses to paste results back.

Affine matrices are float32 [2, 3] mapping frame pixels to crop pixels.
"""

import numpy as np

from dubber.face.crops import CROP_BOX, CROP_FACE, CROP_LIPS, CropSpec
from dubber.face.landmarks import LEFT_EYE, MOUTH, NOSE_TIP, RIGHT_EYE

# Template positions (fractions of a full-face crop side) of the left eye centre, right eye
# centre and nose tip; the crop then spans forehead to chin with the mouth near 0.74.
TEMPLATE = np.array([[0.345, 0.40], [0.655, 0.40], [0.50, 0.585]], np.float32)
LIPS_CENTRE, LIPS_SIDE = (0.50, 0.77), 0.46  # lip crop: this square of the full-face crop
SMOOTH_SIGMA = 1.5  # frames: Gaussian smoothing of the transform parameters over time
ANTIALIAS_BELOW = 0.75  # crop/frame scale under which the frame is blurred before sampling


def stable_points(landmarks: np.ndarray) -> np.ndarray:
    """[..., 68, 2] -> [..., 3, 2]: left eye centre, right eye centre, nose tip."""
    return np.stack([landmarks[..., LEFT_EYE, :].mean(-2), landmarks[..., RIGHT_EYE, :].mean(-2),
                     landmarks[..., NOSE_TIP, :]], axis=-2)


def _template(spec: CropSpec) -> np.ndarray:
    if spec.kind == CROP_LIPS:
        return (TEMPLATE - np.array(LIPS_CENTRE, np.float32)) / LIPS_SIDE + 0.5
    assert spec.kind in (CROP_FACE, CROP_BOX), spec  # CropSpec checks its kind
    return TEMPLATE


def _fit_similarity(src: np.ndarray, dst: np.ndarray):
    """Least-squares similarity src [K, 2] -> dst [K, 2]; returns (scale, angle, centre) where
    `centre` is the src point that lands on dst's origin-relative centre (see crop_transforms)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    denom = (s ** 2).sum()
    a = (s * d).sum() / denom
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / denom
    return float(np.hypot(a, b)), float(np.arctan2(b, a)), src_mean, dst_mean


def _smooth(values: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth [N, D] along time within each run of valid frames (runs never mix)."""
    if sigma <= 0:
        return values
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    out = values.copy()
    n = len(values)
    t = 0
    while t < n:
        if not valid[t]:
            t += 1
            continue
        end = t
        while end < n and valid[end]:
            end += 1
        run = values[t:end]
        padded = np.pad(run, ((radius, radius), (0, 0)), mode="edge")
        for d in range(values.shape[1]):
            out[t:end, d] = np.convolve(padded[:, d], kernel / kernel.sum(), mode="valid")
        t = end
    return out


def crop_transforms(landmarks: np.ndarray, spec: CropSpec, smooth: bool = True) -> np.ndarray:
    """Frame->crop affines for every frame: landmarks [N, 68, 2] -> float32 [N, 2, 3], NaN where no face.

    CROP_FACE/CROP_LIPS remove in-plane rotation; CROP_BOX keeps it (scale + translation only), so
    the crop is an upright window of the frame that can be pasted straight back.
    """
    n = len(landmarks)
    valid = ~np.isnan(landmarks[:, 0, 0])
    template = _template(spec) * spec.size
    params = np.zeros((n, 5), np.float64)  # centre x, centre y, log scale, cos, sin
    for t in np.flatnonzero(valid):
        scale, angle, src_mean, dst_mean = _fit_similarity(stable_points(landmarks[t]), template)
        if spec.kind == CROP_BOX:
            angle = 0.0
        # Frame point that maps to the crop centre: keeps the centre stable when smoothing angle.
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = src_mean + rot.T @ ((np.full(2, spec.size / 2) - dst_mean) / scale)
        params[t] = [centre[0], centre[1], np.log(scale), np.cos(angle), np.sin(angle)]
    if smooth:
        params = _smooth(params, valid, SMOOTH_SIGMA)
    out = np.full((n, 2, 3), np.nan, np.float32)
    for t in np.flatnonzero(valid):
        cx, cy, log_scale, c, s = params[t]
        norm = np.hypot(c, s)
        linear = np.exp(log_scale) * np.array([[c, -s], [s, c]]) / norm
        shift = np.full(2, spec.size / 2) - linear @ np.array([cx, cy])
        out[t] = np.concatenate([linear, shift[:, None]], axis=1)
    return out


def inverse_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a [..., 2, 3] affine (crop->frame when given frame->crop)."""
    linear = matrix[..., :2].astype(np.float64)
    inv = np.linalg.inv(linear)
    return np.concatenate([inv, -inv @ matrix[..., 2:3]], axis=-1).astype(np.float32)


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """[..., 2, 3] affines -> outer after inner, [..., 2, 3] (e.g. crop<-frame after frame<-face)."""
    linear = outer[..., :2] @ inner[..., :2]
    shift = outer[..., :2] @ inner[..., 2:3] + outer[..., 2:3]
    return np.concatenate([linear, shift], axis=-1).astype(np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine to points [..., 2]."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def mouth_points(landmarks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """dlib's 20 mouth points (48-67) in crop coordinates: [68, 2], [2, 3] -> [20, 2]."""
    return transform_points(landmarks[MOUTH], matrix)


def crop_roi(matrix: np.ndarray, size: int, width: int, height: int):
    """Integer frame rectangle (x0, y0, x1, y1) covering the crop, clipped to the frame."""
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float32)
    frame_pts = transform_points(corners, inverse_affine(matrix))
    x0, y0 = np.floor(frame_pts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(frame_pts.max(0)).astype(int) + 2
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def warp_crop(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Cut the aligned crop: frame [H, W, C] uint8 -> [size, size, C] uint8.

    Only the region under the crop is touched; it is low-pass filtered first when the crop is
    much smaller than the face, so the crop does not alias.
    """
    import cv2

    h, w = frame.shape[:2]
    x0, y0, x1, y1 = crop_roi(matrix, size, w, h)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size) + frame.shape[2:], frame.dtype)
    roi = frame[y0:y1, x0:x1]
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < ANTIALIAS_BELOW:
        roi = cv2.GaussianBlur(roi, (0, 0), 0.5 * (1 / scale - 1) + 1e-3)
    local = matrix.astype(np.float64).copy()
    local[:, 2] += local[:, :2] @ np.array([x0, y0])
    return cv2.warpAffine(roi, local, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
