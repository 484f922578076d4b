"""Paste generated face crops back into full frames.

The pasted quantity is the generator's *change* to the crop, warped back through the inverse
alignment: out = F + m·(G↑ − C↑) − m·(1 − k)·(F − C↑), where F is the frame, C the crop the model
saw, G its output, ↑ the inverse warp, m the mask and k = exp(−|G − C| / DETAIL_TAU) keeps the
frame's own fine detail wherever the model changed little (k and the products are formed at the
crop's size and warped back whole: the masks are smooth there, and the frame-sized work stays one
multiply-add however large the face). An unchanged crop therefore returns
the frame bit for bit, and resampling never blurs skin the model did not touch.

The mask is always the soft lower-face mask from the landmarks, over mouth and chin: its top
edge runs below the nose (the nose does not change when a person speaks, and a generator's blend
base may show another frame's nose there: a ghost edge), its sides a little beyond the mouth
corners rather than out to the jaw line (far cheeks are where another frame's pose shows), never
outside the jaw. Two corrections keep the paste invisible at the mask's edge:

- seam: the generator's change along the mask's edge (a tone mismatch: another frame's cheek,
  a different skin shade) is interpolated smoothly inwards and subtracted, so the pasted change
  falls to zero at the edge instead of ending in an arc, while the mouth's own change stays;
- palette: pixels whose colour (chroma) the crop's own lower face never shows -- a generator's
  purple or green smear -- take the nearest chroma it does show, keeping their brightness.

Modes: "feather" (G's colour is matched to the crop's under it), "alpha" (the model's own α
already weights G, as DCK does: no colour matching; the mask still bounds it, so α that strays
onto the jaw line or the collar never reaches the frame), "poisson" (OpenCV seamless cloning of
the feathered result).
"""


import numpy as np

from dubber.face.align import crop_roi, inverse_affine, transform_points
from dubber.face.landmarks import LOWER_JAW

BLEND_MODES = ("feather", "alpha", "poisson")
MASK_FEATHER = 0.05  # Gaussian sigma of the mask edge, as a fraction of the crop side
BORDER_FEATHER = 0.06  # fraction of the crop side over which the crop's own border fades out
DETAIL_TAU = 12.0  # grey levels: changes larger than this drop the frame's original detail
NOSE_BASE = slice(31, 36)  # iBUG: the nose's lower edge, nostril to nostril (33: below the tip)
NOSE_BOTTOM, UPPER_LIP_TOP = 33, 51
NOSE_CLEARANCE = 0.4  # the mask's top edge: this fraction of the way from the nose's base to the upper lip
MOUTH_LEFT, MOUTH_RIGHT = 48, 54  # mouth corners
MOUTH_MARGIN = 0.35  # the mask reaches this many mouth widths beyond each corner (not the whole cheek)
CHIN = slice(4, 13)  # jaw points round the chin
SEAM_SIGMA = 0.08  # fraction of the crop side: how smoothly the change along the mask's edge is spread inwards
PALETTE_RADIUS = 3  # chroma levels (YCrCb) around the crop's own colours that count as its palette


def lower_face_mask(crop_landmarks: np.ndarray, size: int, pads=(0, 0, 0, 0)) -> np.ndarray:
    """Soft mask over mouth, cheeks and chin: crop-space landmarks [68, 2] -> float32 [size, size] in [0, 1].

    pads (top, bottom, left, right; crop pixels, Wav2Lip's order) grow the region by that much on
    each side, or shrink it where negative."""
    import cv2

    # Mouth and chin: below the nose (across its base, lowered towards the upper lip), out beyond
    # the mouth corners, down round the chin; and never outside the jaw line.
    lm = crop_landmarks
    lowered = lm[NOSE_BASE] + NOSE_CLEARANCE * (lm[UPPER_LIP_TOP] - lm[NOSE_BOTTOM])
    across = lm[MOUTH_RIGHT] - lm[MOUTH_LEFT]
    corners = np.stack([lm[MOUTH_LEFT] - MOUTH_MARGIN * across, lm[MOUTH_RIGHT] + MOUTH_MARGIN * across])
    raised = corners + (lowered[len(lowered) // 2] - lm[UPPER_LIP_TOP])  # up to the nose line: corners move
    mask = hull_mask(np.concatenate([lowered, corners, raised, lm[CHIN]]), size)
    mask = np.minimum(mask, hull_mask(np.concatenate([lm[LOWER_JAW], lowered]), size))
    if any(round(p) for p in pads):
        mask = _pad_region(mask, [int(round(p)) for p in pads])
    sigma = MASK_FEATHER * size
    mask = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), sigma)
    return mask * border_mask(size)


def hull_mask(points: np.ndarray, size: int) -> np.ndarray:
    """The convex hull of crop-space points filled: uint8 [size, size] (255 inside, anti-aliased)."""
    import cv2

    hull = cv2.convexHull(np.round(points * 4).astype(np.int32))  # quarter-pixel precision
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=2)
    return mask


def _pad_region(mask: np.ndarray, pads) -> np.ndarray:
    """Move each edge of a uint8 region outwards (inwards where negative) by pads = (top, bottom,
    left, right) pixels: a dilation with the growing parts, then an erosion with the shrinking ones."""
    import cv2

    top, bottom, left, right = pads
    grow = [max(v, 0) for v in (top, bottom, left, right)]
    shrink = [max(-v, 0) for v in (top, bottom, left, right)]
    if any(grow):
        t, b, l, r = grow
        # out(x, y) = max of mask over y - b .. y + t and x - r .. x + l: the top edge moves up by t, ...
        kernel = np.ones((t + b + 1, l + r + 1), np.uint8)
        mask = cv2.dilate(mask, kernel, anchor=(r, b))
    if any(shrink):
        t, b, l, r = shrink
        # out(x, y) = min of mask over y - t .. y + b and x - l .. x + r: the top edge moves down by t, ...
        kernel = np.ones((t + b + 1, l + r + 1), np.uint8)
        mask = cv2.erode(mask, kernel, anchor=(l, t))
    return mask


def border_mask(size: int) -> np.ndarray:
    """1 inside the crop, ramping to 0 at its edges: float32 [size, size]."""
    ramp = np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / max(BORDER_FEATHER * size, 1), 0, 1)
    return np.outer(ramp, ramp).astype(np.float32)


def match_colour(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift the generated crop's per-channel mean/std under `mask` to the source's: [S, S, 3] float32."""
    weight = mask[..., None] / max(float(mask.sum()), 1e-6)
    mean_g, mean_s = (generated * weight).sum((0, 1)), (source * weight).sum((0, 1))
    std_g = np.sqrt(((generated - mean_g) ** 2 * weight).sum((0, 1))) + 1e-3
    std_s = np.sqrt(((source - mean_s) ** 2 * weight).sum((0, 1))) + 1e-3
    gain = np.clip(std_s / std_g, 0.8, 1.25)  # tone correction, not a repaint
    return (generated - mean_g) * gain + mean_s


def match_seam(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Subtract from the change (generated - source) its values along the mask's edge, spread
    smoothly inwards (a membrane-like fill by normalised Gaussian convolution): the change then
    fades to zero at the edge. float32 [S, S, 3] -> float32 [S, S, 3]."""
    import cv2

    ring = 4 * mask * (1 - mask)  # 1 on the mask's 0.5 contour, 0 deep inside and outside
    if float(ring.sum()) < 1e-3:
        return generated
    delta = generated - source
    sigma = SEAM_SIGMA * mask.shape[0]
    spread = cv2.GaussianBlur(delta * ring[..., None], (0, 0), sigma)
    weight = cv2.GaussianBlur(ring, (0, 0), sigma)[..., None]
    return generated - spread / np.maximum(weight, 1e-4)


def match_palette(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give pixels of `generated` whose chroma (YCrCb) appears nowhere in `source` under `mask`
    (within PALETTE_RADIUS) the nearest chroma that does, keeping their brightness (Y). Other
    pixels are returned untouched. float32 BGR [S, S, 3] in [0, 255] -> the same."""
    import cv2
    from scipy.spatial import cKDTree

    inside = mask > 0.5
    if not inside.any():
        return generated
    src = cv2.cvtColor(np.clip(source, 0, 255).astype(np.float32) / 255, cv2.COLOR_BGR2YCrCb)
    gen = cv2.cvtColor(np.clip(generated, 0, 255).astype(np.float32) / 255, cv2.COLOR_BGR2YCrCb)
    occupied = np.zeros((256, 256), np.uint8)
    chroma = np.clip(np.round(src[inside][:, 1:] * 255), 0, 255).astype(np.int64)
    occupied[chroma[:, 0], chroma[:, 1]] = 1
    size = 2 * PALETTE_RADIUS + 1
    occupied = cv2.dilate(occupied, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    cells = np.clip(np.round(gen[..., 1:] * 255), 0, 255).astype(np.int64)
    off = ~occupied[cells[..., 0], cells[..., 1]].astype(bool)
    off &= np.abs(gen[..., 1:] - src[..., 1:]).max(-1) * 255 > PALETTE_RADIUS  # the source's own colours stay
    if not off.any():
        return generated
    # The nearest palette cell of each stray pixel: a k-d tree over the palette (a few hundred to a
    # few thousand cells) costs well under a millisecond for the tens to hundreds of stray pixels
    # of a frame, where a distance transform of the whole 256x256 chroma plane cost ~10 ms.
    palette = np.argwhere(occupied)  # [P, 2] (Cr, Cb) cells
    _, nearest = cKDTree(palette).query(cells[off])
    fixed = gen.copy()
    fixed[off, 1:] = palette[nearest] / 255
    out = generated.copy()
    out[off] = cv2.cvtColor(fixed, cv2.COLOR_YCrCb2BGR)[off] * 255
    return out


def mask_roi(matrix: np.ndarray, mask: np.ndarray, width: int, height: int):
    """Integer frame rectangle (x0, y0, x1, y1) outside which the paste changes nothing: the
    crop-space support of `mask` (float [S, S]) warped back to the frame, with the bilinear
    warp's one-pixel reach, clipped to the crop's own rectangle (dubber.face.align.crop_roi).
    Empty (x1 <= x0) when the mask is zero everywhere."""
    rows, cols = np.flatnonzero(mask.max(1) > 0), np.flatnonzero(mask.max(0) > 0)
    if not len(rows):
        return 0, 0, 0, 0
    corners = np.array([[cols[0] - 1, rows[0] - 1], [cols[-1] + 2, rows[0] - 1],
                        [cols[0] - 1, rows[-1] + 2], [cols[-1] + 2, rows[-1] + 2]], np.float32)
    points = transform_points(corners, inverse_affine(matrix))
    x0, y0 = np.floor(points.min(0)).astype(int) - 2
    x1, y1 = np.ceil(points.max(0)).astype(int) + 2
    cx0, cy0, cx1, cy1 = crop_roi(matrix, mask.shape[0], width, height)
    return max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)


def paste_back(frame: np.ndarray, source_crop: np.ndarray, generated_crop: np.ndarray, matrix: np.ndarray,
               mask: np.ndarray, mode: str = "feather", colour_match: bool = True) -> np.ndarray:
    """Blend a generated crop into its frame.

    frame uint8 [H, W, 3]; source_crop / generated_crop uint8 [S, S, 3] (same channel order as
    frame); matrix float32 [2, 3] frame->crop; mask float32 [S, S] in [0, 1] (crop space).
    Returns a new uint8 frame; pixels outside the crop's footprint are untouched.
    """
    import cv2

    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}")
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = mask_roi(matrix, mask, w, h)
    out = frame.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    source = source_crop.astype(np.float32)
    generated = generated_crop.astype(np.float32)
    if colour_match and mode != "alpha":
        generated = match_colour(generated, source, mask)
    if not np.array_equal(generated_crop, source_crop):
        generated = match_seam(match_palette(generated, source, mask), source, mask)
    back = inverse_affine(matrix).astype(np.float64)
    back[:, 2] -= np.array([x0, y0])  # crop -> ROI coordinates
    dsize = (x1 - x0, y1 - y0)
    unwarp = lambda image: cv2.warpAffine(image, back, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    # out = F + m·(G↑ − C↑) − w·(F − C↑) with w = m·(1 − k) = F·(1 − w) + [m·(G − C) + w·C]↑: the products
    # are formed at the crop's size (the masks are smooth there) and two images warped back, so the
    # frame-sized work is one multiply-add however large the face.
    change = generated - source
    keep_detail = np.exp(np.abs(change).mean(-1) * np.float32(-1 / DETAIL_TAU))
    weight = mask * (1 - keep_detail)
    pasted = unwarp(mask[..., None] * change + weight[..., None] * source)
    weight_up = unwarp(np.ascontiguousarray(weight))[..., None]
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    blended = roi * (1 - weight_up) + pasted
    result = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if mode == "poisson":
        region = (unwarp(np.ascontiguousarray(mask)) > 0.5).astype(np.uint8) * 255
        if region.any():
            ys, xs = np.nonzero(region)
            centre = (int(x0 + (xs.min() + xs.max() + 1) // 2), int(y0 + (ys.min() + ys.max() + 1) // 2))
            full_mask = np.zeros((h, w), np.uint8)
            full_mask[y0:y1, x0:x1] = region
            composite = frame.copy()
            composite[y0:y1, x0:x1] = result
            try:
                return cv2.seamlessClone(composite, frame, full_mask, centre, cv2.NORMAL_CLONE)
            except cv2.error:
                pass  # region touching the frame edge: the feathered paste is the better answer
    out[y0:y1, x0:x1] = result
    return out
