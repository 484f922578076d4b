"""The seeds' evaluation metrics, as plain numpy/cv2 functions (no model, no torch).

Image quality: PSNR, SSIM (Wang et al. 2004), CPBD sharpness (Narvekar & Karam 2011, the
"Lip movements generation at a glance" protocol). Mouth shape: LMD (mean-calibrated, as in Glance).
Sync without a learned model: mouth aperture vs speech envelope correlation. Sync with the learned
expert: LSE-D / LSE-C / AV offset from a [windows, offsets] distance matrix (dubber.eval.sync).
The mouth itself: opening correlation with the real mouth, PSNR and Laplacian sharpness of a box
around the real mouth, mean opening in silence.

Sign convention shared by every lag/offset here: positive = the mouth moves after the sound.
"""

import math
import warnings
from typing import NamedTuple, Optional

import cv2
import numpy as np

from dubber import media
from dubber.face.landmarks import MOUTH

# PSNR
PSNR_MAX_UINT8 = 255.0
PSNR_CAP_DB = 100.0  # per-frame cap when averaging: an identical frame would make the mean inf

# SSIM (Wang et al. 2004)
SSIM_WINDOW = 11  # Gaussian window side, pixels
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# CPBD (Narvekar & Karam 2011)
CPBD_BLOCK = 64  # edge-block side, pixels
CPBD_EDGE_BLOCK_FRACTION = 0.002  # a block is an edge block if > 0.2 % of its pixels are Canny edges
CPBD_BETA = 3.6  # slope of the psychometric function
CPBD_JNB_LOW_CONTRAST = 5.0  # just-noticeable-blur width (pixels) for block contrast <= 50
CPBD_JNB_HIGH_CONTRAST = 3.0  # ... and for contrast > 50
CPBD_CONTRAST_SPLIT = 50  # gray levels (0..255)
CPBD_P_BLUR_THRESHOLD = 0.63  # CPBD = P(P_blur <= 63 %)
CPBD_MAX_WIDTH_STEPS = 100  # edge-width search stops this many pixels out on either side
CPBD_CANNY_SIGMA = 1.0  # Gaussian pre-smoothing before Canny, as MATLAB's edge(..., 'canny')
CPBD_CANNY_NOT_EDGE = 0.7  # MATLAB's automatic Canny thresholds: 70 % of pixels are not edges...
CPBD_CANNY_LOW_RATIO = 0.4  # ... and low threshold = 0.4 * high
CPBD_SOBEL_SCALE = 4.0  # MATLAB's edge(..., 'sobel'): keep gradient^2 > 4 * mean(gradient^2)

# Aperture / envelope sync
HIGH_PASS_SECONDS = 0.5  # moving average removed before correlating: drops slow drifts (head motion, loudness)

# Mouth region
MOUTH_BOX_MARGIN = 0.25  # the lips' box grows by this fraction of its width / height on each side (lip edges, philtrum)
LAPLACIAN_KSIZE = 1  # cv2.Laplacian aperture: 1 is the 3x3 kernel [0 1 0; 1 -4 1; 0 1 0], the finest detail


def _as_batch(images: np.ndarray) -> np.ndarray:
    """[H,W], [H,W,C] or [N,H,W,C] -> float64 [N,H,W,C]."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[:, :, None]
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected an image [H,W(,C)] or a batch [N,H,W,C], got shape {images.shape}")
    return images


def psnr(a: np.ndarray, b: np.ndarray, max_value: float = PSNR_MAX_UINT8, cap_db: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(max_value^2 / MSE).

    a, b: images [H,W,3] (or [H,W]) or batches [N,H,W,3], uint8 or float on the scale of max_value
    (255 for uint8, 1.0 for [0,1] floats). MSE is over all pixels and channels of a frame; a batch
    scores the mean of per-frame PSNRs (the protocol of the lip-sync papers' tables).
    Identical frames have infinite PSNR, so one identical frame makes the mean inf; pass cap_db
    (e.g. 100) to clip each frame's PSNR first when averaging over a dataset.
    """
    a, b = _as_batch(a), _as_batch(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        per_frame = 10.0 * np.log10(max_value ** 2 / mse)
    if cap_db is not None:
        per_frame = np.minimum(per_frame, cap_db)
    return float(np.mean(per_frame))


def _ssim_map(x: np.ndarray, y: np.ndarray, max_value: float) -> np.ndarray:
    """float64 [H,W] pair -> SSIM map over the valid region (window fully inside the image)."""
    c1 = (SSIM_K1 * max_value) ** 2
    c2 = (SSIM_K2 * max_value) ** 2

    def blur(image):
        return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    # Population (biased) moments, as Wang et al.; not the sample covariance.
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    pad = SSIM_WINDOW // 2
    return ssim_map[pad:-pad, pad:-pad]


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = PSNR_MAX_UINT8) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03.

    a, b: [H,W], [H,W,C] or [N,H,W,C], uint8 or float on the scale of max_value; H, W >= 11.
    Colour images score the mean of per-channel SSIM (skimage's channel_axis=-1 protocol, which
    the lip-sync papers' evaluation scripts use), not SSIM of luma. The map is averaged over the
    valid region only (pixels whose window lies inside the image), as in Wang's reference code
    and skimage. A batch scores the mean over frames. Identical images -> 1.0.
    """
    a, b = _as_batch(a), _as_batch(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} for SSIM, got {a.shape[1:3]}")
    scores = [np.mean(_ssim_map(a[n, :, :, c], b[n, :, :, c], max_value))
              for n in range(a.shape[0]) for c in range(a.shape[3])]
    return float(np.mean(scores))


def _to_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        image = image.astype(np.float64) @ np.array(media.LUMA)
    if image.ndim != 2:
        raise ValueError(f"expected a gray image [H,W] or RGB [H,W,3], got shape {image.shape}")
    return image.astype(np.float64)


def _canny_edges(gray: np.ndarray) -> np.ndarray:
    """Boolean Canny edge map with MATLAB's automatic thresholds (so the result is contrast-free)."""
    smoothed = cv2.GaussianBlur(gray, (0, 0), CPBD_CANNY_SIGMA)
    smoothed_u8 = np.clip(np.round(smoothed), 0, 255).astype(np.uint8)
    gx = cv2.Sobel(smoothed_u8, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(smoothed_u8, cv2.CV_64F, 0, 1, ksize=3)
    magnitude = np.hypot(gx, gy)
    if magnitude.max() == 0:
        return np.zeros(gray.shape, dtype=bool)
    high = max(float(np.quantile(magnitude, CPBD_CANNY_NOT_EDGE)), 1e-3 * float(magnitude.max()))
    return cv2.Canny(smoothed_u8, CPBD_CANNY_LOW_RATIO * high, high, L2gradient=True) > 0


def _vertical_sobel_edges(gray: np.ndarray) -> np.ndarray:
    """Thin vertical edges as MATLAB's edge(I, 'sobel', [], 'vertical'): strong |d/dx|, local max along x."""
    strength = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    strength = strength ** 2
    strong = strength > CPBD_SOBEL_SCALE * strength.mean()
    left = np.pad(strength, ((0, 0), (1, 0)))[:, :-1]
    right = np.pad(strength, ((0, 0), (0, 1)))[:, 1:]
    # ">= right" keeps one pixel of the two-pixel plateau a step edge makes.
    return strong & (strength > left) & (strength >= right)


def _runs(condition: np.ndarray, reverse: bool) -> np.ndarray:
    """Per row, length of the run of True ending at each column (reverse: starting at it)."""
    runs = np.zeros(condition.shape, dtype=np.int64)
    columns = range(condition.shape[1] - 1, -1, -1) if reverse else range(condition.shape[1])
    previous = np.zeros(condition.shape[0], dtype=np.int64)
    for col in columns:
        previous = np.where(condition[:, col], previous + 1, 0)
        runs[:, col] = previous
    return runs


def _edge_widths(gray: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Marziliano edge widths along rows: [H,W] with the width (pixels) at horizontal-gradient edges, else 0.

    For an edge pixel whose gradient points right (rising edge), the width is the number of pixels
    from the local minimum on its left to the local maximum on its right; mirrored for falling
    edges. Edges whose gradient is closer to 45/90 degrees get no width, as in the reference code.
    """
    height, width = gray.shape
    grad_y, grad_x = np.gradient(gray)
    angle = 45.0 * np.round(np.degrees(np.arctan2(grad_y, grad_x)) / 45.0)
    rising = edges & (angle == 0)
    falling = edges & (np.abs(angle) == 180)
    inner = np.zeros_like(edges)
    inner[1:-1, 1:-1] = True
    rising &= inner
    falling &= inner

    step = np.diff(gray, axis=1)  # step[:, j] = gray[:, j + 1] - gray[:, j], [H, W-1]
    widths = np.zeros(gray.shape)
    rows, cols = np.nonzero(rising | falling)
    is_rising = rising[rows, cols]

    def side(run_end: np.ndarray, run_start: np.ndarray) -> np.ndarray:
        # Left: pixels walked from col-1 leftwards while still monotonic (steps ending at col-2);
        # right: from col+1 rightwards (steps starting at col+1). Each side counts itself as 1.
        left_index, right_index = cols - 2, cols + 1
        left = np.where(left_index >= 0, run_end[rows, np.clip(left_index, 0, width - 2)], 0)
        right = np.where(right_index <= width - 2, run_start[rows, np.clip(right_index, 0, width - 2)], 0)
        return np.minimum(left, CPBD_MAX_WIDTH_STEPS) + np.minimum(right, CPBD_MAX_WIDTH_STEPS) + 2

    up = side(_runs(step > 0, reverse=False), _runs(step > 0, reverse=True))
    down = side(_runs(step < 0, reverse=False), _runs(step < 0, reverse=True))
    widths[rows, cols] = np.where(is_rising, up, down)
    return widths


def cpbd(gray: np.ndarray) -> float:
    """Cumulative Probability of Blur Detection (Narvekar & Karam 2011), in [0, 1]; higher = sharper.

    gray: [H,W] on the 0..255 scale (uint8 or float); an RGB [H,W,3] image is converted to BT.601 luma.
    Protocol: Canny edges choose the 64x64 edge blocks (> 0.2 % edge pixels; only whole blocks, so
    images under 64x64 have none); thinned vertical Sobel edges get Marziliano widths w along rows;
    each block's just-noticeable-blur width is 5 px if its contrast (max - min) <= 50, else 3 px;
    P_blur = 1 - exp(-(w / w_JNB)^3.6) per edge; CPBD = fraction of edges with P_blur <= 0.63
    (P_blur rounded to 0.01, as in the reference code). No edge block -> 0.
    """
    gray = _to_gray(gray)
    canny = _canny_edges(gray)
    widths = _edge_widths(gray, _vertical_sobel_edges(gray))

    n_sharp, n_edges = 0, 0
    min_edges = CPBD_BLOCK * CPBD_BLOCK * CPBD_EDGE_BLOCK_FRACTION
    for top in range(0, gray.shape[0] - CPBD_BLOCK + 1, CPBD_BLOCK):
        for left in range(0, gray.shape[1] - CPBD_BLOCK + 1, CPBD_BLOCK):
            block = (slice(top, top + CPBD_BLOCK), slice(left, left + CPBD_BLOCK))
            if np.count_nonzero(canny[block]) <= min_edges:
                continue
            block_widths = widths[block][widths[block] > 0]
            contrast = int(gray[block].max() - gray[block].min())
            jnb = CPBD_JNB_LOW_CONTRAST if contrast <= CPBD_CONTRAST_SPLIT else CPBD_JNB_HIGH_CONTRAST
            p_blur = np.round(1.0 - np.exp(-np.abs(block_widths / jnb) ** CPBD_BETA), 2)
            n_sharp += int(np.count_nonzero(p_blur <= CPBD_P_BLUR_THRESHOLD))
            n_edges += block_widths.size
    return n_sharp / n_edges if n_edges else 0.0


def _mouth_points(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[2] != 2 or landmarks.shape[1] not in (20, 68):
        raise ValueError(f"expected mouth points [N,20,2] or landmarks [N,68,2], got shape {landmarks.shape}")
    return landmarks[:, MOUTH] if landmarks.shape[1] == 68 else landmarks


def mouth_landmark_distance(gen_mouths: np.ndarray, real_mouths: np.ndarray) -> float:
    """LMD, mean-calibrated as in Glance (Chen et al. 2018), in pixels of the aligned face.

    gen_mouths, real_mouths: [N,20,2] mouth points (dlib 48-67; [N,68,2] is sliced to them), both
    already in the same fixed-size aligned face frame, frame n against frame n. Each sequence's mean
    mouth position (over all points and frames) is subtracted first, so a constant shift of the
    whole mouth is not counted; LMD = mean over frames and points of the Euclidean distance.
    """
    gen, real = _mouth_points(gen_mouths), _mouth_points(real_mouths)
    if gen.shape != real.shape:
        raise ValueError(f"shape mismatch: {gen.shape} vs {real.shape}")
    gen = gen - gen.mean(axis=(0, 1), keepdims=True)
    real = real - real.mean(axis=(0, 1), keepdims=True)
    return float(np.mean(np.linalg.norm(gen - real, axis=2)))


def mean_mouth_distance(real_mouths: np.ndarray) -> float:
    """LMD of the sequence's own mean mouth held still against it ([N,20,2] or [N,68,2]): what a
    still mouth of the right average shape scores. The still frame holds one frame's mouth, often a
    closed one; on GRID's and the val identities' clips this figure is 15-17 % below it."""
    real = _mouth_points(real_mouths)
    return mouth_landmark_distance(np.broadcast_to(real.mean(0), real.shape), real)


def high_pass(signal: np.ndarray, window: int) -> np.ndarray:
    """signal [N] minus its centred moving average over `window` frames (shrunk at the ends, no padding bias)."""
    signal = np.asarray(signal, dtype=np.float64)
    half = max(window, 1) // 2
    cumsum = np.concatenate([[0.0], np.cumsum(signal)])
    index = np.arange(signal.size)
    lo = np.clip(index - half, 0, signal.size)
    hi = np.clip(index + half + 1, 0, signal.size)
    return signal - (cumsum[hi] - cumsum[lo]) / (hi - lo)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator > 0 else float("nan")


class SyncCorrelation(NamedTuple):
    corr_at_zero: float  # Pearson r at lag 0 (nan if either signal is constant)
    best_corr: float  # highest r over lags -max_lag..max_lag
    best_lag: int  # frames; positive = the mouth moves after the sound


def aperture_envelope_sync(aperture: np.ndarray, envelope: np.ndarray, fps: float = 25.0,
                           max_lag: int = 3) -> SyncCorrelation:
    """Correlation of mouth opening with the speech envelope, a model-free sync measure.

    aperture, envelope: [N] per video frame (e.g. face.landmarks.mouth_aperture() and
    dubber.audio.envelope() at the frame times). Each is high-passed (minus a centred moving
    average over HIGH_PASS_SECONDS of frames at `fps`) so slow drifts don't count. Lag L pairs aperture[t + L] with envelope[t],
    so a positive best_lag means the mouth moves after the sound. Ties go to the smaller |lag|.
    """
    aperture = np.asarray(aperture, dtype=np.float64)
    envelope = np.asarray(envelope, dtype=np.float64)
    if aperture.shape != envelope.shape or aperture.ndim != 1:
        raise ValueError(f"expected two [N] signals, got {aperture.shape} and {envelope.shape}")
    if aperture.size < 2 * max_lag + 3:
        raise ValueError(f"need at least {2 * max_lag + 3} frames for max_lag={max_lag}, got {aperture.size}")
    window = max(3, int(round(HIGH_PASS_SECONDS * fps)) | 1)  # odd, so the average is centred
    mouth, sound = high_pass(aperture, window), high_pass(envelope, window)
    n = mouth.size

    def corr(lag: int) -> float:
        if lag >= 0:
            return _pearson(mouth[lag:], sound[:n - lag])
        return _pearson(mouth[:n + lag], sound[-lag:])

    lags = sorted(range(-max_lag, max_lag + 1), key=abs)
    corrs = [corr(lag) for lag in lags]
    valid = [i for i, c in enumerate(corrs) if not np.isnan(c)]
    if not valid:
        return SyncCorrelation(float("nan"), float("nan"), 0)
    best = max(valid, key=lambda i: corrs[i])  # max() keeps the first of equals: the smallest |lag|
    return SyncCorrelation(corrs[0], corrs[best], lags[best])


def lse(distances: np.ndarray) -> dict:
    """Lip-sync error metrics from SyncNet distances: [W, O] -> dict.

    distances[w, o]: embedding distance between 5-frame video window w and the audio shifted by
    (o - O // 2) frames, i.e. the O columns are audio shifts -c..c with c = O // 2 (O odd); NaN
    marks shifts that fall outside the clip. Following syncnet_python's evaluate(), which produces
    the LSE-D / LSE-C of Wav2Lip's tables, the per-window rows are first averaged into one curve:
      lse_d  = min of the window-averaged curve (lower = better sync),
      lse_c  = median(curve) - min(curve) (confidence; higher = better),
      offset = c - argmin(curve), frames; positive = the mouth moves after the sound (the AV offset
               syncnet_python prints).
    Also returned, the per-window variants: lse_d_window = mean_w min_o distances[w],
    lse_c_window = mean_w (median_o - min_o distances[w]); and the same two at offset 0, the
    alignment as delivered: lse_d0 = curve[c], lse_c0 = median(curve) - curve[c] (equal to
    lse_d / lse_c when the best offset is 0, lower otherwise); and the curve itself, float64 [O]
    (column o at audio shift o - c, i.e. at offset c - o), for plots.

    lse_d and lse_c do not punish a track shifted by k frames, |k| < c: its curve is the real
    track's moved k columns, so the same minimum is found at column c + k, and the median is then
    taken over true offsets k-c..k+c instead of -c..c; for any expert whose distance grows away
    from the true offset that median is no lower, so lse_c(shifted) >= lse_c(real). Only lse_d0,
    lse_c0 and the offset see the shift.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[1] % 2 != 1:
        raise ValueError(f"expected distances [W, O] with odd O, got shape {distances.shape}")
    usable = ~np.all(np.isnan(distances), axis=1)
    if not usable.any():
        raise ValueError("no window has any finite distance")
    distances = distances[usable]
    with warnings.catch_warnings():  # a column no window reaches is all-NaN; nan-aware reductions skip it
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = np.nanmean(distances, axis=0)
    best = int(np.nanargmin(curve))
    window_min = np.nanmin(distances, axis=1)
    centre = distances.shape[1] // 2
    return {
        # At offset 0, i.e. the alignment as delivered: a shifted track the search would find and
        # forgive (a 0.5 s shift is 12.5 frames, inside the +-15 search) is punished here.
        "lse_d0": float(curve[centre]),
        "lse_c0": float(np.nanmedian(curve) - curve[centre]),
        "lse_d": float(curve[best]),
        "lse_c": float(np.nanmedian(curve) - curve[best]),
        "offset": distances.shape[1] // 2 - best,
        "lse_d_window": float(np.mean(window_min)),
        "lse_c_window": float(np.mean(np.nanmedian(distances, axis=1) - window_min)),
        "curve": curve,
    }


def mouth_box(mouth_points: np.ndarray, shape, margin: float = MOUTH_BOX_MARGIN) -> np.ndarray:
    """Integer box around the lips, grown by `margin` of its width / height on each side, inside the image.

    mouth_points: [K,2] or [N,K,2] (x, y) pixels, the mouth landmarks (dlib 48-67: the inner lip lies
    within the outer, so their box is the outer lip's; [.,68,2] is sliced to them); shape: the image's
    (H, W). Returns (x0, y0, x1, y1) int, [4] or [N,4], for image[y0:y1, x0:x1]; never empty.
    """
    points = np.asarray(mouth_points, dtype=np.float64)
    single = points.ndim == 2
    points = _mouth_points(points[None] if single else points)
    low, high = points.min(axis=1), points.max(axis=1)  # [N,2] each
    grow = margin * (high - low)
    height, width = shape[:2]
    limit = np.array([width, height])
    low = np.clip(np.floor(low - grow), 0, limit - 1).astype(np.int64)
    high = np.clip(np.ceil(high + grow), low + 1, limit).astype(np.int64)
    boxes = np.concatenate([low, high], axis=1)
    return boxes[0] if single else boxes


def cut_box(image: np.ndarray, box) -> np.ndarray:
    """image [H,W(,C)] inside box (x0, y0, x1, y1) int: image[y0:y1, x0:x1] (a view)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return np.asarray(image)[y0:y1, x0:x1]


def mouth_psnr(images, real_images, boxes: np.ndarray, cap_db: float = PSNR_CAP_DB) -> float:
    """Mean over frames of the PSNR (dB, each frame capped at cap_db) inside each frame's box.

    images, real_images: [N,H,W,3] uint8 (or sequences of N such frames); boxes: [N,4] (x0, y0, x1, y1)
    from mouth_box, one per frame and the same for both images of a frame. Identical -> cap_db.
    """
    if not len(boxes) == len(images) == len(real_images):
        raise ValueError(f"{len(images)} and {len(real_images)} frames for {len(boxes)} boxes")
    return float(np.mean([psnr(cut_box(a, box), cut_box(b, box), cap_db=cap_db)
                          for a, b, box in zip(images, real_images, boxes)]))


def laplacian_variance(gray: np.ndarray) -> float:
    """Sharpness of an image: variance of its Laplacian (3x3), in grey levels^2; higher = sharper.

    gray: [H,W] on the 0..255 scale (an RGB [H,W,3] image is converted to BT.601 luma). A flat image -> 0.
    """
    return float(np.var(cv2.Laplacian(_to_gray(gray), cv2.CV_64F, ksize=LAPLACIAN_KSIZE)))


def mouth_sharpness(grays, boxes: np.ndarray) -> float:
    """Mean over frames of laplacian_variance inside each frame's box: grays [N,H,W] (0..255), boxes [N,4]."""
    if len(boxes) != len(grays):
        raise ValueError(f"{len(grays)} frames for {len(boxes)} boxes")
    return float(np.mean([laplacian_variance(cut_box(g, box)) for g, box in zip(grays, boxes)]))


def mouth_flicker(images, boxes: np.ndarray, frames: np.ndarray) -> float:
    """Mean frame-to-frame change inside the mouth box (grey levels, mean absolute difference):
    images [N,H,W(,C)] uint8 of frames `frames` [N] (ascending source indices), boxes [N,4] from
    mouth_box; only pairs of consecutive frames count, each judged in the earlier frame's box.
    Real speech moves the mouth too: compare a system's figure with the ground truth's. NaN
    without a consecutive pair."""
    if not len(boxes) == len(images) == len(frames):
        raise ValueError(f"{len(images)} frames, {len(frames)} indices and {len(boxes)} boxes")
    changes = [np.abs(cut_box(images[k + 1], boxes[k]).astype(np.float64) - cut_box(images[k], boxes[k])).mean()
               for k in range(len(frames) - 1) if frames[k + 1] == frames[k] + 1]
    return float(np.mean(changes)) if changes else math.nan


def mouth_opening_correlation(opening: np.ndarray, real_opening: np.ndarray) -> float:
    """Pearson r between a system's per-frame mouth opening and the real clip's, in [-1, 1].

    opening, real_opening: [N] scale-free openings (face.landmarks.mouth_aperture); frames where
    either is NaN (no face) are left out. A real mouth that never moves (constant series, or fewer
    than 2 frames) gives NaN: there is nothing to follow. A system mouth that never moves (a still
    frame) while the real one does gives 0: it follows none of it. No warning either way.
    """
    opening = np.asarray(opening, dtype=np.float64)
    real_opening = np.asarray(real_opening, dtype=np.float64)
    if opening.shape != real_opening.shape or opening.ndim != 1:
        raise ValueError(f"expected two [N] series, got {opening.shape} and {real_opening.shape}")
    both = np.isfinite(opening) & np.isfinite(real_opening)
    opening, real_opening = opening[both], real_opening[both]
    # np.ptp, not the variance: the mean of equal floats can differ from them in the last bit.
    if real_opening.size < 2 or np.ptp(real_opening) == 0:
        return float("nan")
    if np.ptp(opening) == 0:
        return 0.0
    return _pearson(opening, real_opening)


def silence_mean(values: np.ndarray, speech: np.ndarray) -> float:
    """Mean of values [N] over the frames without speech (speech: bool [N], audio.speech_frames);
    NaN values (no face) are left out; NaN when no silent frame is left."""
    values = np.asarray(values, dtype=np.float64)
    speech = np.asarray(speech, dtype=bool)
    if values.shape != speech.shape or values.ndim != 1:
        raise ValueError(f"expected [N] values and speech, got {values.shape} and {speech.shape}")
    chosen = values[~speech & np.isfinite(values)]
    return float(chosen.mean()) if chosen.size else float("nan")
