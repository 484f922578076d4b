"""The thin-plate mouth warp (dubber.face.morph) and the mouth bank rendering a predicted shape with it."""

import numpy as np

from dubber.face.morph import ANCHOR_REACH, FADE_REACH, morph_mouth
from dubber.face.landmarks import centred_mouth
from dubber.mouthbank import MouthBank
from test_rewrite import _mouth


def _face(points: np.ndarray, size: int = 128) -> np.ndarray:
    """A grey crop with a textured background and a dark dot on each mouth point."""
    import cv2

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    for x, y in points:
        cv2.circle(image, (int(round(x)), int(round(y))), 1, (0, 0, 0), -1)
    return image


def _dark_centroid(image: np.ndarray, near: np.ndarray, radius: float = 3.0) -> np.ndarray:
    ys, xs = np.mgrid[:image.shape[0], :image.shape[1]]
    darkness = np.clip(60 - image.mean(-1), 0, None) * (np.hypot(xs - near[0], ys - near[1]) < radius)
    return np.array([(xs * darkness).sum(), (ys * darkness).sum()]) / darkness.sum()


def test_identity_warp_changes_nothing():
    points = _mouth(6.0)
    image = _face(points)
    assert np.array_equal(morph_mouth(image, points, points), image)


def test_points_land_on_the_target_and_the_rest_stays():
    source = _mouth(4.0)
    target = source.copy()
    target[9, 1] += 4.0  # the bottom of the outer lower lip (dlib 57) drops 4 px
    image = _face(source)
    out = morph_mouth(image, source, target)
    moved = _dark_centroid(out, target[9])
    assert np.linalg.norm(moved - target[9]) < 1.0, moved
    # beyond the fade (FADE_REACH ring radii from the mouth's centre) every pixel is as it was
    centre, width = source.mean(0), np.linalg.norm(source[6] - source[0])
    ys, xs = np.mgrid[:128, :128]
    reach = np.hypot((xs - centre[0]) / (ANCHOR_REACH[0] * width), (ys - centre[1]) / (ANCHOR_REACH[1] * width))
    far = reach > FADE_REACH + 0.05
    assert np.array_equal(out[far], image[far])


def test_render_shape_moves_the_retrieved_mouth_onto_the_prediction():
    openings = [0, 10]
    crops = np.stack([_face(_mouth(o)) for o in openings])
    bank = MouthBank(crops, np.stack([_mouth(o) for o in openings]), np.arange(2))
    wanted = _mouth(3.5)  # the closest real mouth (0) is warped open: its lower lip 1.75 px lower
    out = bank.render_shape(centred_mouth(wanted) - bank.mean_shape)
    lip = 9  # dlib 57
    assert np.linalg.norm(_dark_centroid(out, wanted[lip]) - wanted[lip]) < 0.6
    placed = bank.render_shape(wanted - bank.mean_points, centred=False)  # where the lips are, too
    assert np.linalg.norm(_dark_centroid(placed, wanted[lip]) - wanted[lip]) < 0.6
