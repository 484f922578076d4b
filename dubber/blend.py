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
# The pasted change is warped back with bicubic interpolation: bilinear's second resampling (after
# the crop's) softens a real mouth (the rewrite backbone's, on val_select clips of 2 s and more:
# mouth sharpness 0.79 -> 0.85 of the real mouth's)
PASTE_INTERPOLATION = 2  # cv2.INTER_CUBIC (cv2 is imported where it is used)
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
    size = mask.shape[0]
    # The change along the ring and the ring itself, blurred together at half size (the blur is
    # SEAM_SIGMA = 10 px wide at 128 px, far smoother than the halving): 1.6 -> 0.5 ms a crop.
    stacked = np.concatenate([(generated - source) * ring[..., None], ring[..., None]], axis=-1)
    small = cv2.resize(stacked, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), SEAM_SIGMA * size / 2)
    spread = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return generated - spread[..., :3] / np.maximum(spread[..., 3:], 1e-4)


class Palette:
    """The chroma (YCrCb) that `source` shows under `mask`, grown by PALETTE_RADIUS: `fix` gives
    the pixels of a generated crop whose chroma lies outside it the nearest chroma inside,
    keeping their brightness (Y). Built once per source crop (a photo's every frame shares one)."""

    def __init__(self, source: np.ndarray, mask: np.ndarray):
        """source float32 BGR [S, S, 3] in [0, 255]; mask float32 [S, S]."""
        import cv2

        inside = mask > 0.5
        self.empty = not inside.any()
        # Which pixels stray is decided on 8-bit YCrCb (OpenCV's integer conversion: 0.3 ms where
        # the float one with its rounding cost ~6 ms a 128-pixel crop); strays are recoloured in float.
        self.source_ycc = cv2.cvtColor(_to_uint8(source), cv2.COLOR_BGR2YCrCb)
        occupied = np.zeros((256, 256), np.uint8)
        pixels = self.source_ycc[inside]
        occupied[pixels[:, 1], pixels[:, 2]] = 1
        size = 2 * PALETTE_RADIUS + 1
        self.occupied = cv2.dilate(occupied, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
        self._nearest = None  # [256, 256, 2]: the nearest palette cell of every chroma, made on first use

    def fix(self, generated: np.ndarray) -> np.ndarray:
        """float32 BGR [S, S, 3] in [0, 255] -> the same, strays recoloured (others untouched)."""
        import cv2

        if self.empty:
            return generated
        ycc = cv2.cvtColor(_to_uint8(generated), cv2.COLOR_BGR2YCrCb)
        off = self.occupied[ycc[..., 1], ycc[..., 2]] == 0
        if not off.any():
            return generated
        off &= cv2.absdiff(ycc, self.source_ycc)[..., 1:].max(-1) > PALETTE_RADIUS  # the source's own colours stay
        if not off.any():
            return generated
        strays = cv2.cvtColor(np.clip(generated[off][:, None], 0, 255) / np.float32(255), cv2.COLOR_BGR2YCrCb)
        strays[:, 0, 1:] = self.nearest(ycc[off][:, 1:]) / np.float32(255)
        out = generated.copy()
        out[off] = cv2.cvtColor(strays, cv2.COLOR_YCrCb2BGR)[:, 0] * 255
        return out

    def nearest(self, chroma: np.ndarray) -> np.ndarray:
        """The nearest palette cell of each (Cr, Cb) in uint8 [N, 2]: [N, 2].

        From a table of the whole 256x256 chroma plane made on first use: OpenCV's labelled
        distance transform (5x5 mask, within ~2 % of Euclidean), 0.6 ms however many pixels stray."""
        import cv2

        if self._nearest is None:
            _, labels = cv2.distanceTransformWithLabels((self.occupied == 0).astype(np.uint8), cv2.DIST_L2, 5,
                                                        labelType=cv2.DIST_LABEL_PIXEL)
            cells = np.argwhere(self.occupied)  # [P, 2]: each palette cell carries its own label
            by_label = np.zeros((labels.max() + 1, 2), np.int64)
            by_label[labels[cells[:, 0], cells[:, 1]]] = cells
            self._nearest = by_label[labels]  # [256, 256, 2]
        return self._nearest[chroma[:, 0], chroma[:, 1]]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def match_palette(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give pixels of `generated` whose chroma (YCrCb) appears nowhere in `source` under `mask`
    (within PALETTE_RADIUS) the nearest chroma that does, keeping their brightness (Y) (Palette).
    float32 BGR [S, S, 3] in [0, 255] -> the same."""
    return Palette(source, mask).fix(generated)


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


class Paster:
    """A paste prepared for one frame, crop and mask: everything that does not depend on the
    generated crop is done once here (a photo's every output frame shares one), `__call__` does the rest.

    frame uint8 [H, W, 3]; source_crop uint8 [S, S, 3] (same channel order as frame); matrix
    float32 [2, 3] frame->crop; mask float32 [S, S] in [0, 1] (crop space).
    """

    def __init__(self, frame: np.ndarray, source_crop: np.ndarray, matrix: np.ndarray, mask: np.ndarray,
                 mode: str = "feather", colour_match: bool = True):
        if mode not in BLEND_MODES:
            raise ValueError(f"unknown blend mode {mode!r}")
        self.frame, self.source_crop, self.mask, self.mode = frame, source_crop, mask, mode
        self.colour_match = colour_match and mode != "alpha"
        h, w = frame.shape[:2]
        self.roi = x0, y0, x1, y1 = mask_roi(matrix, mask, w, h)
        self.empty = x1 <= x0 or y1 <= y0
        if self.empty:
            return
        self.source = source_crop.astype(np.float32)
        self.palette = None  # built on the first changed crop
        self.back = inverse_affine(matrix).astype(np.float64)
        self.back[:, 2] -= np.array([x0, y0])  # crop -> ROI coordinates
        self.size = (x1 - x0, y1 - y0)

    def __call__(self, generated_crop: np.ndarray) -> np.ndarray:
        """generated_crop uint8 [S, S, 3] -> a new uint8 frame; pixels outside the crop's
        footprint are untouched."""
        import cv2

        out = self.frame.copy()
        if self.empty:
            return out
        source, mask = self.source, self.mask
        generated = generated_crop.astype(np.float32)
        if self.colour_match:
            generated = match_colour(generated, source, mask)
        if not np.array_equal(generated_crop, self.source_crop):
            if self.palette is None:
                self.palette = Palette(source, mask)
            generated = match_seam(self.palette.fix(generated), source, mask)
        # out = F + m·(G↑ − C↑) − w·(F − C↑) with w = m·(1 − k) = F·(1 − w)↑ + [m·(G − C) + w·C]↑: the
        # products are formed at the crop's size (the masks are smooth there) and warped back as one
        # 4-channel image (1 − w outside the crop: the frame kept), so the frame-sized work is one
        # multiply-add however large the face; cv2.add rounds and saturates as it stores uint8.
        change = generated - source
        keep_detail = np.exp(np.abs(change).mean(-1) * np.float32(-1 / DETAIL_TAU))
        weight = mask * (1 - keep_detail)
        layers = np.concatenate([mask[..., None] * change + weight[..., None] * source, 1 - weight[..., None]], -1)
        back_up = cv2.warpAffine(layers, self.back, self.size, flags=PASTE_INTERPOLATION,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 1))
        x0, y0, x1, y1 = self.roi
        blended = self.frame[y0:y1, x0:x1] * back_up[..., 3:]
        blended += back_up[..., :3]
        result = cv2.add(blended, 0.0, dtype=cv2.CV_8U)
        if self.mode == "poisson":
            cloned = self._poisson(result)
            if cloned is not None:
                return cloned
        out[y0:y1, x0:x1] = result
        return out

    def _poisson(self, result: np.ndarray):
        """OpenCV seamless cloning of the pasted ROI into the frame, or None where it cannot."""
        import cv2

        x0, y0, x1, y1 = self.roi
        region = cv2.warpAffine(np.ascontiguousarray(self.mask), self.back, self.size, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT) > 0.5
        if not region.any():
            return None
        ys, xs = np.nonzero(region)
        centre = (int(x0 + (xs.min() + xs.max() + 1) // 2), int(y0 + (ys.min() + ys.max() + 1) // 2))
        h, w = self.frame.shape[:2]
        full_mask = np.zeros((h, w), np.uint8)
        full_mask[y0:y1, x0:x1] = region.astype(np.uint8) * 255
        composite = self.frame.copy()
        composite[y0:y1, x0:x1] = result
        try:
            return cv2.seamlessClone(composite, self.frame, full_mask, centre, cv2.NORMAL_CLONE)
        except cv2.error:
            return None  # region touching the frame edge: the feathered paste is the better answer


def paste_back(frame: np.ndarray, source_crop: np.ndarray, generated_crop: np.ndarray, matrix: np.ndarray,
               mask: np.ndarray, mode: str = "feather", colour_match: bool = True) -> np.ndarray:
    """Blend a generated crop into its frame (Paster, prepared and used once): a new uint8 frame."""
    return Paster(frame, source_crop, matrix, mask, mode, colour_match)(generated_crop)
