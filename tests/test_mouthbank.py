"""The mouth bank (dubber.mouthbank): retrieval by shape with continuity, the real mouth put back
on a smudged crop, and `dubber lipsync --mouth-bank / --mouth-bank-source` and `dubber eval
--mouth-bank-source` through the real CLI on the tiny talking-face video of conftest."""

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.analysis import analyse
from dubber.errors import DubberError
from dubber.eval.metrics import laplacian_variance
from dubber.face.align import crop_transforms
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.mouthbank import MIN_ENTRIES, MouthBank, build_bank, crop_box, mouth_shape

SPEC = CropSpec(CROP_BOX, 128)  # DCK's crop


def _mouth(opening: float, width: float = 30.0) -> np.ndarray:
    """20 mouth points [20, 2] of a schematic mouth `opening` pixels open (outer 12, inner 8)."""
    outer = np.stack([np.linspace(-width / 2, width / 2, 12), np.zeros(12)], 1)
    outer[1:6, 1], outer[7:12, 1] = -4, 4 + opening
    inner = np.stack([np.linspace(-width / 3, width / 3, 8), np.zeros(8)], 1)
    inner[1:4, 1], inner[5:8, 1] = -1, 1 + opening
    return (np.concatenate([outer, inner]) + 64).astype(np.float32)


def _bank(openings, frames=None) -> MouthBank:
    n = len(openings)
    return MouthBank(np.zeros((n, 128, 128, 3), np.uint8), np.stack([_mouth(o) for o in openings]),
                     np.arange(n) if frames is None else np.asarray(frames))


def test_retrieval_takes_the_closest_shape_and_keeps_a_run_going():
    bank = _bank([0, 2, 4, 6, 8, 10, 12])
    assert bank.retrieve(_mouth(7.6)) == 4  # closest: the 8-pixel opening
    # the successor of the previous pick (entry 5, opening 10) is nearly as close as the best: it plays on
    assert bank.retrieve(_mouth(8.9)) == 5
    bank.reset()
    assert bank.retrieve(_mouth(8.9)) == 4  # without a previous pick: the closest
    # a gap in the source frames is not a continuation
    gapped = _bank([0, 4, 8, 10], frames=[0, 1, 2, 40])
    assert gapped.retrieve(_mouth(8)) == 2 and gapped.retrieve(_mouth(8.9)) == 2


def test_retrieval_weighs_how_the_mouth_looks():
    """Two mouths of one shape (say lips parted over teeth, or over a dark mouth): the one whose
    mouth region looks like the generated crop's is taken."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    bank = MouthBank(crops, np.stack([_mouth(4), _mouth(4), _mouth(9)]), np.array([0, 10, 20]))
    assert bank.retrieve(_mouth(4), crops[1]) == 1
    bank.reset()
    assert bank.retrieve(_mouth(4), crops[0]) == 0


@pytest.fixture(scope="module")
def bank(face_video):
    info = media.probe(face_video)
    track = analyse(face_video, info=info).track
    return build_bank(info, track, SPEC), track


def test_build_bank_cuts_every_frame_with_a_face(bank, face_video):
    bank, track = bank
    assert len(bank) == int(track.valid.sum()) == 50 and bank.crops.shape == (50, 128, 128, 3)
    assert bank.source == face_video.name and np.all(np.diff(bank.frames) == 1)
    # the bank's landmarks are measured on its own crops, as the generated ones will be
    assert np.isfinite(bank.points).all() and np.ptp(bank.points[:, :, 0], 1).min() > 10  # a mouth, not a point


def test_a_smudged_mouth_gets_the_real_one_back(bank):
    import cv2

    bank, track = bank
    real = bank.crops[10]
    t = bank.frames[10]
    box = crop_box(track.boxes[t], crop_transforms(track.landmarks, SPEC)[t])  # the face box in the crop
    points = mouth_shape(real, box)
    x0, y0 = np.floor(points.min(0)).astype(int) - 3
    x1, y1 = np.ceil(points.max(0)).astype(int) + 3
    smudged = real.copy()
    smudged[y0:y1, x0:x1] = cv2.GaussianBlur(real, (0, 0), 3)[y0:y1, x0:x1]  # a generator's soft lips
    bank.reset()
    out = bank.render(smudged, box)
    sharpness = lambda image: laplacian_variance(cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY))
    assert sharpness(out) > 2 * sharpness(smudged)
    assert helpers.psnr(out, real, (x0, y0, x1, y1)) > helpers.psnr(smudged, real, (x0, y0, x1, y1)) + 1.5  # 2.3-3.2 dB seen
    far = np.ones((128, 128), bool)
    far[max(y0 - 20, 0):y1 + 20, max(x0 - 20, 0):x1 + 20] = False
    assert np.abs(out.astype(int) - smudged)[far].max() <= 1  # only the lips change


def test_too_few_faces_is_refused(face_video):
    info = media.probe(face_video)
    track = analyse(face_video, info=info).track
    track.landmarks[MIN_ENTRIES - 1:] = np.nan
    with pytest.raises(DubberError, match=f"at least {MIN_ENTRIES} frames with a face; found {MIN_ENTRIES - 1}"):
        build_bank(info, track, SPEC)


def test_lipsync_mouth_bank(face_video, speech_1s, tmp_path):
    """--mouth-bank over a backbone that draws mouths (dck; rewrite always renders from the bank)."""
    plain, banked, other = tmp_path / "plain.mp4", tmp_path / "bank.mp4", tmp_path / "other.mp4"
    for out, extra in ((plain, []), (banked, ["--mouth-bank"]), (other, ["--mouth-bank-source", face_video])):
        code, stdout, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", out, "--backbone", "dck",
                                                "--device", "cpu", "-q", *extra])
        assert code == 0, stderr
        assert stdout.strip() == str(out)
    a, b, c = (helpers.decode_frames(p) for p in (plain, banked, other))
    assert len(a) == len(b) == len(c) == 25
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))  # the bank changed the lips
    # the bank from another file with the same frames is the same bank
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(b, c)) <= 2


@pytest.mark.parametrize("extra, words", [
    (["--mouth-bank-source", "{photo}"], ["--mouth-bank-source", "a photo holds one mouth"]),
    (["--mouth-bank-source", "{tmp}/missing.mp4"], ["--mouth-bank-source", "not found"]),
    (["--mouth-bank-source", "{video}", "--no-mouth-bank"], ["--mouth-bank-source", "contradicts --no-mouth-bank"]),
])
def test_lipsync_mouth_bank_refusals(extra, words, face_video, face_still, speech_1s, tmp_path):
    values = {"photo": face_still, "tmp": tmp_path, "video": face_video}
    code, _, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", tmp_path / "o.mp4",
                                       *[a.format(**values) for a in extra]])
    assert code == 2, stderr
    line = stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
    assert list(tmp_path.iterdir()) == []


def test_a_photo_dubs_with_its_own_lips_unless_told_not_to(face_still, speech_1s, tmp_path):
    """A photo's one mouth is its bank by default (pipeline.PHOTO_LIPS): its lips, warped onto the
    generated ones, replace the generated texture; --no-mouth-bank leaves the generated lips."""
    outs = {}
    for name, extra in (("default", []), ("bank", ["--mouth-bank"]), ("none", ["--no-mouth-bank"])):
        outs[name] = tmp_path / f"{name}.mp4"
        code, _, stderr = helpers.run_cli(["lipsync", face_still, speech_1s, "-o", outs[name], "--backbone", "dck",
                                           "--device", "cpu", "-q", *extra])
        assert code == 0, stderr
    default, bank, none = (helpers.decode_frames(outs[n]) for n in ("default", "bank", "none"))
    assert all(np.array_equal(a, b) for a, b in zip(default, bank))
    assert any(not np.array_equal(a, b) for a, b in zip(default, none))


def test_a_photo_bank_holds_its_one_mouth(face_still):
    info = media.probe(face_still)
    track = analyse(face_still).track
    bank = build_bank(info, track, SPEC)
    assert len(bank) == 1 and bank.crops.shape == (1, SPEC.size, SPEC.size, 3)
    assert np.isfinite(bank.points).all() and bank.points.std() > 1


def test_rewrite_on_a_photo_is_still_refused(face_still, speech_1s, tmp_path):
    """Rewrite's shapes need a video's mouths to render from (one photo mouth barely moves)."""
    code, _, stderr = helpers.run_cli(["lipsync", face_still, speech_1s, "-o", tmp_path / "o.mp4",
                                       "--backbone", "rewrite"])
    assert code == 2 and "--backbone" in stderr and "photo" in stderr, stderr


def test_eval_refuses_a_bank_of_the_clip_it_scores(face_video, tmp_path):
    """Scoring a clip with its own mouths in the bank would copy the answer: that clip fails."""
    root = tmp_path / "clips"
    root.mkdir()
    clip = root / face_video.name
    clip.write_bytes(face_video.read_bytes())
    code, _, stderr = helpers.run_cli(["eval", "--dataset", "folder", "--root", root, "--backbone", "dck",
                                       "--out", tmp_path / "out", "--no-sync-expert", "--device", "cpu", "-q",
                                       "--mouth-bank-source", face_video])
    assert code == 1 and "mouth bank's own source" in stderr, stderr
