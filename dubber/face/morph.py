"""Moving a mouth onto another shape: a thin-plate-spline warp of the region round the lips.

The mouth bank (dubber.mouthbank) holds the person's real mouths; the closest one to a predicted
shape is rarely that shape (a short video holds few mouths, and retrieval by nearest neighbour
snaps every prediction to one of them). Warping the retrieved mouth so its 20 landmarks land on
the predicted ones keeps its real texture and gives it the predicted shape (IP_LAP, Zhong et al.
2023, warps its references the same way). A ring of fixed anchors round the mouth keeps the warp
local: beyond it the spline's remainder fades out, and the rest of the face does not move.
"""

import numpy as np

from dubber.face.landmarks import mouth_width

ANCHOR_RING = 12  # fixed points on an ellipse round the mouth
ANCHOR_REACH = (1.0, 0.9)  # the ring's semi-axes, in mouth widths (x, y), from the mouth's centre
REGULARISATION = 1e-3  # thin-plate smoothing: landmarks a pixel apart must not fold the warp
FADE_REACH = 1.5  # beyond the ring the spline's small remainder fades to nothing by this many ring radii
GRID_STEP = 4  # pixels between the points the spline is evaluated at (it is smooth: the rest is interpolated)


def _kernel(distance_sq: np.ndarray) -> np.ndarray:
    """Thin-plate radial basis r^2 log r^2 (0 at r = 0)."""
    return distance_sq * np.log(np.maximum(distance_sq, 1e-12))


def _ring(mouth: np.ndarray):
    """Centre [2] and semi-axes [2] (pixels) of the anchor ellipse round mouth points [20, 2] (dlib 48-67)."""
    return mouth.mean(0), mouth_width(mouth) * np.array(ANCHOR_REACH)


def mouth_anchors(mouth: np.ndarray) -> np.ndarray:
    """The fixed ring round mouth points [20, 2]: [ANCHOR_RING, 2]."""
    centre, axes = _ring(mouth)
    angles = np.linspace(0, 2 * np.pi, ANCHOR_RING, endpoint=False)
    return (centre + axes * np.stack([np.cos(angles), np.sin(angles)], 1)).astype(np.float32)


def morph_mouth(image: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`image` with its mouth, landmarks `source` [20, 2], moved onto `target` [20, 2] (pixels):
    uint8 [S, S, C] -> uint8 [S, S, C]. Nothing beyond FADE_REACH ring radii changes."""
    import cv2

    anchors = mouth_anchors(source)
    controls = np.concatenate([target, anchors]).astype(np.float64)  # where points end up
    values = np.concatenate([source, anchors]).astype(np.float64)  # where each is sampled from
    n = len(controls)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _kernel(((controls[:, None] - controls[None]) ** 2).sum(-1)) + REGULARISATION * np.eye(n)
    system[:n, n] = 1
    system[:n, n + 1:] = controls
    system[n, :n] = 1
    system[n + 1:, :n] = controls.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = values
    weights = np.linalg.solve(system, rhs)  # [n + 3, 2]: radial weights, then the affine part
    height, width = image.shape[:2]
    centre, axes = _ring(source)
    x0, y0 = np.floor(centre - FADE_REACH * axes).astype(int).clip(0, [width, height])
    x1, y1 = (np.ceil(centre + FADE_REACH * axes).astype(int) + 1).clip(0, [width, height])
    if x1 <= x0 or y1 <= y0 or not np.isfinite(weights).all():
        return image
    ys, xs = np.mgrid[y0:y1 + GRID_STEP:GRID_STEP, x0:x1 + GRID_STEP:GRID_STEP]
    coarse = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    radial = _kernel(((coarse[:, None] - controls[None]) ** 2).sum(-1))
    shift = radial @ weights[:n] + weights[n] + coarse @ weights[n + 1:] - coarse
    reach = np.sqrt((((coarse - centre) / axes) ** 2).sum(1))  # 1 on the ring
    fade = np.clip((FADE_REACH - reach) / (FADE_REACH - 1), 0, 1)
    shift *= (fade * fade * (3 - 2 * fade))[:, None]  # smoothstep: no kink where the fade starts or ends
    shift = shift.reshape(*xs.shape, 2).astype(np.float32)
    # the coarse grid spans pixels x0 .. x0 + step * (w - 1): stretched onto them (to within a pixel of
    # the smooth shift: resize aligns pixel centres, not corners)
    span = ((xs.shape[1] - 1) * GRID_STEP + 1, (xs.shape[0] - 1) * GRID_STEP + 1)
    shift = cv2.resize(shift, span, interpolation=cv2.INTER_LINEAR)[:y1 - y0, :x1 - x0]
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    maps = np.stack([xs, ys], -1) + shift
    out = image.copy()
    out[y0:y1, x0:x1] = cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return out
