"""The mouth metrics of `dubber eval` (dubber.eval.metrics): opening correlation, mouth box, mouth
PSNR, Laplacian sharpness and mean opening in silence, against hand-computed values."""

import math
import warnings

import cv2
import numpy as np
import pytest

from dubber import audio
from dubber.eval import metrics
from dubber.face import landmarks


def _opening_series(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return np.abs(cv2.GaussianBlur(rng.normal(size=(n, 1)), (0, 0), 2.0)[:, 0])


def _faces(openings, scales):
    """[N,68,2] landmarks: inter-ocular distance 40 * scale, inner lips `opening * scale` apart."""
    points = np.zeros((len(openings), 68, 2))
    points[:, landmarks.LEFT_EYE] = [30.0, 40.0]
    points[:, landmarks.RIGHT_EYE] = [70.0, 40.0]
    for upper, lower in landmarks.INNER_LIP_PAIRS:
        points[:, upper] = [50.0, 80.0]
        points[:, lower, 0] = 50.0
        points[:, lower, 1] = 80.0 + np.asarray(openings)
    return points * np.asarray(scales)[:, None, None]


def test_opening_correlation_with_itself_is_one_and_with_its_mirror_minus_one():
    opening = _opening_series()
    assert metrics.mouth_opening_correlation(opening, opening) == pytest.approx(1.0)
    assert metrics.mouth_opening_correlation(opening.max() - opening, opening) == pytest.approx(-1.0)
    other = _opening_series(seed=1)
    assert abs(metrics.mouth_opening_correlation(other, opening)) < 0.5  # unrelated mouths: not near +-1


def test_opening_correlation_is_scale_free_through_the_landmarks():
    """The same mouth motion seen with the head coming closer (all landmarks scaled) correlates fully."""
    opening = 10 * _opening_series()
    scales = np.linspace(1.0, 2.5, opening.size)
    near = landmarks.mouth_aperture(_faces(opening, scales))
    far = landmarks.mouth_aperture(_faces(opening, np.ones(opening.size)))
    assert metrics.mouth_opening_correlation(near, far) == pytest.approx(1.0)
    # The raw pixel gaps, not divided by the eye distance, would let the head motion in.
    assert metrics.mouth_opening_correlation(opening * scales, far) < 0.95


def test_opening_correlation_constant_series_without_warnings():
    opening = _opening_series()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.mouth_opening_correlation(np.full_like(opening, 0.1), opening) == 0.0  # a still mouth
        assert math.isnan(metrics.mouth_opening_correlation(opening, np.full_like(opening, 0.1)))  # nothing to follow
        assert math.isnan(metrics.mouth_opening_correlation(opening[:1], opening[:1]))


def test_opening_correlation_leaves_out_frames_without_a_face():
    opening, other = _opening_series(), _opening_series(seed=2)
    gappy = other.copy()
    gappy[10:20] = np.nan
    expected = metrics.mouth_opening_correlation(np.delete(other, range(10, 20)), np.delete(opening, range(10, 20)))
    assert metrics.mouth_opening_correlation(gappy, opening) == pytest.approx(expected)
    real_gappy = opening.copy()
    real_gappy[:5] = np.nan
    assert metrics.mouth_opening_correlation(opening, real_gappy) == pytest.approx(1.0)


def test_mouth_box_grows_by_the_margin_and_stays_inside():
    points = np.zeros((68, 2))
    points[:] = [500.0, 500.0]  # not mouth points: must not count
    points[landmarks.MOUTH] = [40.0, 60.0]
    points[landmarks.MOUTH.start] = [20.0, 50.0]
    points[landmarks.MOUTH.start + 1] = [60.0, 70.0]  # lips span x 20..60, y 50..70
    box = metrics.mouth_box(points, (128, 128), margin=0.25)
    assert box.tolist() == [10, 45, 70, 75]
    assert metrics.mouth_box(points, (128, 128), margin=0.0).tolist() == [20, 50, 60, 70]
    # Near the edge the box is clipped to the image, and a degenerate mouth still gets one pixel.
    edge = points + [100.0, 0.0]
    assert metrics.mouth_box(edge, (128, 128), margin=0.25).tolist() == [110, 45, 128, 75]
    dot = np.full((20, 2), 30.0)
    x0, y0, x1, y1 = metrics.mouth_box(dot, (64, 64))
    assert x1 > x0 and y1 > y0
    batch = metrics.mouth_box(np.stack([points, edge]), (128, 128), margin=0.25)
    assert batch.tolist() == [[10, 45, 70, 75], [110, 45, 128, 75]]


def test_mouth_psnr_identical_is_the_cap_and_only_the_box_counts():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    boxes = np.array([[8, 8, 24, 24]] * 3)
    assert metrics.mouth_psnr(real, real.copy(), boxes) == metrics.PSNR_CAP_DB
    outside = real.copy()
    outside[:, :8] = 255 - outside[:, :8]  # rows above the box
    assert metrics.mouth_psnr(outside, real, boxes) == metrics.PSNR_CAP_DB
    inside = real.astype(np.int16)
    inside[1, 8:24, 8:24] += np.where(inside[1, 8:24, 8:24] < 128, 10, -10).astype(np.int16)  # MSE 100 in frame 1
    expected = (2 * metrics.PSNR_CAP_DB + 10 * math.log10(255 ** 2 / 100)) / 3
    assert metrics.mouth_psnr(inside.astype(np.uint8), real, boxes) == pytest.approx(expected)


def test_blurred_mouth_is_less_sharp():
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 256, (48, 64)).astype(np.uint8)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 1.5)
    assert metrics.laplacian_variance(blurred) < 0.2 * metrics.laplacian_variance(sharp)
    assert metrics.laplacian_variance(np.full((16, 16), 90, np.uint8)) == 0.0
    # Inside the box only: texture outside it does not make a flat mouth sharp.
    frame = np.full((48, 64), 90, np.uint8)
    frame[:, :16] = sharp[:, :16]
    boxes = np.array([[24, 8, 56, 40]])
    assert metrics.mouth_sharpness([frame], boxes) == 0.0
    assert metrics.mouth_sharpness([sharp, blurred], np.array([[24, 8, 56, 40]] * 2)) == pytest.approx(
        (metrics.laplacian_variance(sharp[8:40, 24:56]) + metrics.laplacian_variance(blurred[8:40, 24:56])) / 2)


def test_silence_mean_takes_the_frames_without_speech():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    speech = np.array([True, False, True, False, False, True])
    assert metrics.silence_mean(values, speech) == pytest.approx(3.0)  # frames 1 and 3; frame 4 has no face
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.silence_mean(values, np.ones(6, bool)))


def test_silence_mean_with_the_speech_rule():
    """With audio.speech_frames: a mouth open only while the envelope is loud is closed in silence."""
    envelope = np.array([0.0, 0.01, 0.5, 0.6, 0.55, 0.02, 0.0, 0.7, 0.65, 0.0], np.float32)
    speech = audio.speech_frames(envelope)
    assert speech.tolist() == [False, False, True, True, True, False, False, True, True, False]
    follows = np.where(speech, 0.3, 0.02)
    stuck_open = np.full(envelope.size, 0.3)
    assert metrics.silence_mean(follows, speech) == pytest.approx(0.02)
    assert metrics.silence_mean(stuck_open, speech) == pytest.approx(0.3)


def test_min_seconds_leaves_out_short_clips(face_video, tmp_path):
    """`dubber eval --min-seconds`: clips shorter than it are not scored; an unreadable one is kept
    (scoring reports it as failed)."""
    import shutil

    from dubber.errors import DubberError
    from dubber.eval.run import list_clips

    root = tmp_path / "clips"
    root.mkdir()
    shutil.copy(face_video, root / "two_seconds.mp4")
    (root / "broken.mp4").write_bytes(b"not a video")
    assert [c.name for c in list_clips("folder", root, min_seconds=1.5)] == ["clips_broken", "clips_two_seconds"]
    assert [c.name for c in list_clips("folder", root, min_seconds=2.5)] == ["clips_broken"]
    (root / "broken.mp4").unlink()
    with pytest.raises(DubberError, match="no folder clips found"):
        list_clips("folder", root, min_seconds=2.5)
