"""Metric functions against hand-computed values and, for SSIM, scikit-image."""

import math

import cv2
import numpy as np
import pytest

from dubber.eval import metrics
from dubber.face import landmarks


def _random_pair(seed=0, shape=(40, 56, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    noisy = a.astype(np.float64) + rng.normal(0, 25, shape)
    b = cv2.GaussianBlur(np.clip(noisy, 0, 255).astype(np.uint8), (5, 5), 1.0)
    return a, b


def test_psnr_identical_is_inf_or_cap():
    a, _ = _random_pair()
    assert metrics.psnr(a, a) == math.inf
    assert metrics.psnr(a, a, cap_db=100.0) == 100.0


def test_psnr_known_mse():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)  # MSE 100
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    # [0,1] floats with max_value 1: MSE 0.01 -> 20 dB
    assert metrics.psnr(a.astype(np.float32), b.astype(np.float32) / 100, max_value=1.0) == pytest.approx(20.0)
    # A batch scores the mean of per-frame PSNRs (MSE 100 and 400), not PSNR of the pooled MSE.
    batch_b = np.stack([b, b * 2])
    expected = (10 * math.log10(255 ** 2 / 100) + 10 * math.log10(255 ** 2 / 400)) / 2
    assert metrics.psnr(np.stack([a, a]), batch_b) == pytest.approx(expected)


def test_ssim_identical_is_one():
    a, _ = _random_pair()
    assert metrics.ssim(a, a) == pytest.approx(1.0)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    a, b = _random_pair(seed=1)
    assert metrics.ssim(a, b) == pytest.approx(structural_similarity(a, b, channel_axis=-1, **kwargs), abs=1e-3)
    gray_a, gray_b = a[..., 0], b[..., 0]
    assert metrics.ssim(gray_a, gray_b) == pytest.approx(structural_similarity(gray_a, gray_b, **kwargs), abs=1e-3)
    assert metrics.ssim(a, b) < 0.9  # not trivially 1


def _checkerboard(size=256, square=16, low=25, high=225):
    y, x = np.mgrid[:size, :size]
    return np.where(((y // square) + (x // square)) % 2 == 1, high, low).astype(np.uint8)


def test_cpbd_sharp_checkerboard_beats_blurred():
    board = _checkerboard()
    sharp = metrics.cpbd(board)
    blurred = metrics.cpbd(cv2.GaussianBlur(board, (0, 0), 2.0))
    # Step edges are 2 px wide: P_blur = 1 - exp(-(2/3)^3.6) = 0.21 <= 0.63, all sharp.
    assert sharp == pytest.approx(1.0)
    assert blurred < 0.1
    assert metrics.cpbd(np.full((128, 128), 100, np.uint8)) == 0.0  # no edge block


def _ramp_stripes(contrast, ramp=4, flat=12, size=128, low=100):
    """Vertical stripes whose edges are linear ramps of `ramp` steps: each edge is `ramp` px wide."""
    up = low + contrast * np.arange(1, ramp) / ramp
    period = np.concatenate([np.full(flat, low), up, np.full(flat, low + contrast), up[::-1]])
    row = np.tile(period, size // period.size + 1)[:size]
    return np.tile(row, (size, 1)).astype(np.float64)


def test_cpbd_just_noticeable_width_depends_on_contrast():
    # 4-px edges: with JNB 5 (contrast <= 50) P_blur = 1 - exp(-(4/5)^3.6) = 0.36 -> sharp;
    # with JNB 3 (contrast > 50) P_blur = 0.94 -> blurred.
    assert metrics.cpbd(_ramp_stripes(contrast=40)) == pytest.approx(1.0)
    assert metrics.cpbd(_ramp_stripes(contrast=200)) == pytest.approx(0.0)


def _mouth(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(20, 80, (n, 20, 2))


def test_lmd_identical_and_shift_are_zero():
    real = _mouth()
    assert metrics.mouth_landmark_distance(real, real) == 0.0
    assert metrics.mouth_landmark_distance(real + np.array([7.0, -3.0]), real) == pytest.approx(0.0, abs=1e-12)


def test_lmd_known_perturbation():
    real = _mouth()
    # Zero-mean perturbation (half the points +1 px in x, half -1): every point is 1 px off.
    signs = np.where(np.arange(20) < 10, 1.0, -1.0)
    gen = real.copy()
    gen[:, :, 0] += signs
    assert metrics.mouth_landmark_distance(gen, real) == pytest.approx(1.0)
    # Moving only frame 0 of 2 by (6, 8): the sequence mean moves by (3, 4), so after calibration
    # frame 0 is off by +(3, 4) and frame 1 by -(3, 4): 5 px everywhere. (A per-frame calibration
    # would wrongly give 0.)
    real2 = _mouth(n=2)
    gen2 = real2.copy()
    gen2[0] += np.array([6.0, 8.0])
    assert metrics.mouth_landmark_distance(gen2, real2) == pytest.approx(5.0)
    # 68-point input is cut to the mouth points.
    full_real = np.zeros((2, 68, 2))
    full_gen = np.zeros((2, 68, 2))
    full_real[:, 48:] = real2
    full_gen[:, 48:] = gen2
    full_gen[:, :48] = 1000.0  # non-mouth points must not count
    assert metrics.mouth_landmark_distance(full_gen, full_real) == pytest.approx(5.0)


def test_the_mean_mouth_held_still_beats_its_first_frame_held_still():
    # Two frames: 8 of the 20 points drop by 2 px in the second (the lips open). The mean mouth has
    # the sequence's centroid (no calibration shift) and is 1 px off at those 8 points in both
    # frames, 0 elsewhere: 8/20 = 0.4. The first frame held is shifted by the calibration (the
    # centroids differ by 8/20 * 1 px = 0.4 px): 0.4 everywhere in frame 0; in frame 1 2 - 0.4 at
    # the 8 points and 0.4 elsewhere, 0.88: 0.64 on average.
    real = np.repeat(_mouth(n=1), 2, 0)
    real[1, :8, 1] += 2.0
    assert metrics.mean_mouth_distance(real) == pytest.approx(0.4)
    assert metrics.mouth_landmark_distance(np.repeat(real[:1], 2, 0), real) == pytest.approx(0.64)
    assert metrics.mean_mouth_distance(np.repeat(real[:1], 5, 0)) == pytest.approx(0.0, abs=1e-9)  # never moves


def _face_landmarks(opening, scale=1.0):
    points = np.zeros((68, 2))
    points[36:42] = [30.0, 40.0]  # left eye centre
    points[42:48] = [70.0, 40.0]  # right eye centre: inter-ocular distance 40
    for upper, lower in landmarks.INNER_LIP_PAIRS:
        points[upper] = [50.0, 80.0]
        points[lower] = [50.0, 80.0 + opening]
    return points * scale


def test_mouth_aperture_is_scale_free():
    faces = np.stack([_face_landmarks(0.0), _face_landmarks(10.0), _face_landmarks(10.0, scale=3.0)])
    assert landmarks.mouth_aperture(faces) == pytest.approx([0.0, 0.25, 0.25])


def test_aperture_envelope_lag_recovered():
    rng = np.random.default_rng(3)
    n, shift = 250, 2
    sound = cv2.GaussianBlur(rng.normal(size=(n + 10, 1)), (0, 0), 1.0)[:, 0]
    drift = np.linspace(0, 5, n)  # slow head motion: removed by the high-pass filter
    envelope = sound[10:]
    mouth_late = sound[10 - shift:n + 10 - shift] + drift  # mouth moves `shift` frames after the sound
    result = metrics.aperture_envelope_sync(mouth_late, envelope, fps=25, max_lag=3)
    assert result.best_lag == shift
    assert result.best_corr > 0.95
    assert result.corr_at_zero < result.best_corr - 0.2
    mouth_early = sound[10 + shift - 5:n + 10 + shift - 5]  # mouth moves before the sound
    envelope_early = sound[5:n + 5]
    assert metrics.aperture_envelope_sync(mouth_early, envelope_early, fps=25).best_lag == -shift
    assert math.isnan(metrics.aperture_envelope_sync(np.ones(n), envelope).corr_at_zero)


def test_lse_hand_built():
    distances = np.array([[5, 4, 3, 4, 5],
                          [6, 5, 4, 5, 6],
                          [4, 3, 2, 3, 4]], dtype=float)
    scores = metrics.lse(distances)
    assert scores["lse_d"] == pytest.approx(3.0)  # min of the averaged curve [5, 4, 3, 4, 5]
    assert scores["lse_c"] == pytest.approx(1.0)  # its median 4 - min 3
    assert scores["offset"] == 0
    assert scores["lse_d_window"] == pytest.approx(3.0)
    assert scores["lse_c_window"] == pytest.approx(1.0)
    assert scores["curve"].tolist() == [5, 4, 3, 4, 5]  # kept for the report's offset plots


def test_lse_offset_sign_and_curve_vs_window():
    # Best audio 2 frames earlier than the video (column 0 = shift -2): the mouth moves after the sound.
    assert metrics.lse(np.array([[1.0, 2, 3, 4, 5]]))["offset"] == 2
    assert metrics.lse(np.array([[5.0, 4, 3, 2, 1]]))["offset"] == -2
    # Averaging first (syncnet_python) and per-window minima disagree when windows disagree.
    scores = metrics.lse(np.array([[1.0, 9, 9], [9, 9, 1]]))
    assert scores["lse_d"] == pytest.approx(5.0)
    assert scores["lse_c"] == pytest.approx(0.0)
    assert scores["lse_d_window"] == pytest.approx(1.0)
    assert scores["lse_c_window"] == pytest.approx(8.0)


def test_lse_ignores_out_of_clip_nans():
    scores = metrics.lse(np.array([[np.nan, 2, 1], [3, 2, np.nan]]))
    assert scores["lse_d"] == pytest.approx(1.0)  # curve [3, 2, 1]
    assert scores["lse_c"] == pytest.approx(1.0)
    assert scores["offset"] == -1


def test_lse_forgives_an_in_range_shift_and_lse_c0_does_not():
    # A valley at the true offset over a rising plateau, as a sync expert gives.
    offsets = np.arange(-15, 16)
    def curve(true_offset):
        gap = np.abs(offsets - true_offset)
        return np.minimum(gap, 4) * 0.1 + gap * 0.005 + 0.8
    real, shifted = metrics.lse(curve(0)[None]), metrics.lse(curve(-12)[None])
    assert shifted["offset"] == 12 and shifted["lse_d"] == pytest.approx(real["lse_d"])
    assert shifted["lse_c"] >= real["lse_c"]  # the search finds the shift and forgives it
    assert shifted["lse_c0"] < real["lse_c0"] - 0.3  # at the delivered alignment it is punished
