"""The paste-back leaves no seam: the mask stays off the nose, a tone mismatch along its edge is
removed (no arc), colours the face never shows (a purple smear) take the nearest it does, and on a
real clip the dub changes the face outside the mouth far less than before."""

import numpy as np
import pytest

import helpers
from dubber.blend import lower_face_mask, match_palette, match_seam, paste_back
from dubber.face.align import crop_transforms, transform_points, warp_crop
from dubber.face.crops import CropSpec
from dubber.pipeline import analyse

SPEC = CropSpec("box", 128)


@pytest.fixture(scope="module")
def photo():
    """The example photo, its landmarks, the crop transform, the crop and its mask."""
    frame = helpers.face_photo()
    landmarks = analyse(helpers.FACE_PHOTO).track.landmarks[0]
    matrix = crop_transforms(landmarks[None], SPEC)[0]
    crop = warp_crop(frame, matrix, SPEC.size)
    points = transform_points(landmarks, matrix)
    return {"frame": frame, "landmarks": landmarks, "matrix": matrix, "crop": crop, "points": points,
            "mask": lower_face_mask(points, SPEC.size)}


def _at(mask, point):
    x, y = np.round(point).astype(int)
    return float(mask[y, x])


def test_the_mask_covers_mouth_and_chin_not_the_nose(photo):
    """(The mask used to run up to the nose bridge: 0.9 at the nose tip, where a blend base's other
    nose then showed as a ghost edge.)"""
    mask, points = photo["mask"], photo["points"]
    for k in (48, 51, 54, 57, 62, 66):  # mouth corners, lips
        assert _at(mask, points[k]) > 0.75, k
    assert _at(mask, (points[57] + points[8]) / 2) > 0.9  # the chin
    assert _at(mask, points[30]) < 0.2  # the nose tip
    for k in (31, 35):  # the nostrils' outer edges
        assert _at(mask, points[k]) < 0.45, k
    for k in (0, 1, 15, 16):  # the jaw up by the ears: cheeks away from the mouth stay
        assert _at(mask, points[k]) < 0.1, k


def test_a_tone_mismatch_along_the_edge_leaves_no_arc(photo):
    """A generated crop 25 grey levels brighter all over (another frame's shade): the change along
    the mask's edge, the arc, is gone; an open mouth (the inner lips painted dark) stays dark."""
    import cv2

    crop, mask = photo["crop"].astype(np.float32), photo["mask"]
    edge = (mask > 0.1) & (mask < 0.9)
    fixed = match_seam(crop + 25, crop, mask)
    assert np.abs((fixed - crop)[edge]).mean() < 2.0  # was 25 all along the edge
    inner = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(inner, np.round(photo["points"][60:68]).astype(np.int32), 1)
    inner = inner.astype(bool)
    opened = crop.copy()
    opened[inner] = 20
    fixed = match_seam(opened, crop, mask)
    depth = (crop - opened)[inner].mean()
    assert (crop - fixed)[inner].mean() > 0.7 * depth  # the mouth's own change stays
    assert np.array_equal(match_seam(crop, crop, mask), crop)  # no change, nothing to correct


def test_colours_the_face_never_shows_take_the_nearest_it_does(photo):
    import cv2

    crop, mask = photo["crop"].astype(np.float32), photo["mask"]
    generated = crop.copy()
    lips = photo["points"][48:60]
    x0, y0 = lips.min(0).astype(int)
    x1, y1 = lips.max(0).astype(int)
    generated[y0:y1, x0:x1] = (200, 60, 170)  # BGR: a purple smear
    fixed = match_palette(generated, crop, mask)
    ycc = lambda im: cv2.cvtColor(np.clip(im, 0, 255).astype(np.uint8), cv2.COLOR_BGR2YCrCb).astype(int)
    source, smear, after = ycc(crop)[mask > 0.5], ycc(generated)[y0:y1, x0:x1], ycc(fixed)[y0:y1, x0:x1]
    blue_max = source[:, 2].max()
    assert smear[..., 2].min() > blue_max + 20  # far bluer than anything in the face
    assert after[..., 2].max() <= blue_max + 4  # now within the face's own palette
    assert np.abs(after[..., 0] - smear[..., 0]).max() <= 3  # brightness kept
    outside = np.ones(crop.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(fixed[outside], generated[outside])  # the face's own colours untouched
    assert np.array_equal(match_palette(crop, crop, mask), crop)


def test_an_unchanged_crop_still_returns_the_frame_bit_for_bit(photo):
    frame, crop = photo["frame"], photo["crop"]
    assert np.array_equal(paste_back(frame, crop, crop, photo["matrix"], photo["mask"], "alpha"), frame)


WILD = next((p for p in (helpers.REPO.parent / "shared" / "data" / "wild" / "hdtf_KatieHill.mp4",
                          helpers.Path("/work/shared/data/wild/hdtf_KatieHill.mp4")) if p.is_file()),
            helpers.REPO.parent / "shared" / "data" / "wild" / "hdtf_KatieHill.mp4")


def _outside_mouth_change(source_frames, output_frames, landmarks):
    """Mean |change| and mean |gradient of the change| over the lower face outside the mouth
    (the outer lips grown by a third of the mouth's width): where an arc or a ghost edge shows."""
    import cv2

    grads, changes = [], []
    for frame, out, lm in zip(source_frames, output_frames, landmarks):
        if np.isnan(lm[0, 0]):
            continue
        h, w = frame.shape[:2]
        change = out.astype(float).mean(-1) - frame.astype(float).mean(-1)
        gy, gx = np.gradient(cv2.GaussianBlur(change, (0, 0), 1.0))
        face = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(face, cv2.convexHull(np.round(np.concatenate([lm[2:15], lm[[29]]])).astype(np.int32)), 1)
        mouth = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(mouth, cv2.convexHull(np.round(lm[48:60]).astype(np.int32)), 1)
        k = int(0.33 * (lm[54, 0] - lm[48, 0])) * 2 + 1
        zone = (face > 0) & (cv2.dilate(mouth, np.ones((k, k), np.uint8)) == 0)
        grads.append(np.hypot(gx, gy)[zone].mean())
        changes.append(np.abs(change[zone]).mean())
    return float(np.mean(changes)), float(np.mean(grads))


@pytest.mark.slow
@pytest.mark.parametrize("backbone, most_change, most_gradient", [("dck", 3.5, 0.95), ("rewrite", 3.5, 1.1)])
def test_no_arc_or_ghost_on_a_real_clip(tmp_path, backbone, most_change, most_gradient):
    """Each backbone on the held-out identity hdtf_KatieHill (its first second): outside the mouth
    the face changes little and smoothly. Before these fixes (DCK): 5.0 grey levels, gradient 1.22
    (arc, nose). The zone takes in the chin, which moves with the jaw: DCK's session-2 weights gave
    2.37 / 0.74, the session-5 weights, whose mouth opens more with the speech, 2.76 / 0.80 (no arc
    to see); rewrite, whose lower face (chin included) is another real frame's, 3.15 / 0.96."""
    if not WILD.is_file():
        pytest.skip("../shared/data/wild/hdtf_KatieHill.mp4 is not on this machine")
    speech = helpers.make_tone_speech(tmp_path / "speech.wav", 1.0)
    output = tmp_path / "dub.mp4"
    code, _, stderr = helpers.run_cli(["lipsync", WILD, speech, "-o", output, "--duration", "1", "--backbone",
                                       backbone, "-q"])
    assert code == 0, stderr
    source = helpers.decode_frames(WILD)[:25]
    result = helpers.decode_frames(output)
    landmarks = analyse(WILD).track.landmarks[:25]
    change, gradient = _outside_mouth_change(source, result, landmarks)
    print(f"outside the mouth: mean |change| {change:.2f}, mean |gradient| {gradient:.2f}")
    assert change < most_change and gradient < most_gradient  # an arc or a ghost edge: 5.0 / 1.22
