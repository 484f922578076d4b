"""Fast unit tests of the core pieces: audio windows, schedule, alignment, paste-back, checkpoints."""

import numpy as np
import pytest
import torch

from dubber import audio
from dubber.backbones import CROP_BOX, CROP_FACE, CROP_LIPS, CropSpec
from dubber.blend import border_mask, lower_face_mask, match_colour, paste_back
from dubber.checkpoint import SelfDescribing, load_model, load_package, save_model, state_sha256
from dubber.errors import DubberError
from dubber.face.align import TEMPLATE, compose_affine, crop_transforms, inverse_affine, stable_points, transform_points, warp_crop
from dubber.conditioning import closed_mouth_frame
from dubber.pipeline import pingpong


def synthetic_landmarks(n=30, centre=(200.0, 150.0), scale=1.0, angle=0.0, jitter=0.0, seed=0):
    """68 points laid out like a face: eyes, nose tip and a jaw/mouth around them, [n, 68, 2]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-60, 60, (68, 2)).astype(np.float32)
    base[36:42] = [-30, -20] + rng.normal(0, 2, (6, 2))
    base[42:48] = [30, -20] + rng.normal(0, 2, (6, 2))
    base[30] = [0, 15]
    base[36:42] -= base[36:42].mean(0) - [-30, -20]
    base[42:48] -= base[42:48].mean(0) - [30, -20]
    c, s = np.cos(angle), np.sin(angle)
    rotated = base @ np.array([[c, s], [-s, c]], np.float32) * scale + np.array(centre, np.float32)
    return np.repeat(rotated[None], n, 0) + rng.normal(0, jitter, (n, 68, 2)).astype(np.float32)


def test_mel_windows_follow_timestamps():
    mel = np.tile(np.arange(400, dtype=np.float32), (audio.N_MELS, 1))  # column index as value
    times = np.array([0.0, 1.0, 2.5, 1 / 29.97 * 100])
    windows = audio.mel_windows(mel, times, 16)
    assert windows.shape == (4, audio.N_MELS, 16)
    for w, t in zip(windows, times):
        assert w[0, 8] == round(t * audio.MEL_FPS)  # window centred on the frame time
    edge = audio.mel_windows(mel, np.array([0.0]), 16)[0, 0]
    assert (edge[:8] == -4).all() and edge[8] == 0  # silence padding before the start


def test_log_mel_shape_and_range():
    t = np.arange(audio.SAMPLE_RATE) / audio.SAMPLE_RATE
    mel = audio.log_mel((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert mel.shape[0] == audio.N_MELS and abs(mel.shape[1] - audio.MEL_FPS) <= 1
    assert mel.min() >= -4 and mel.max() <= 4 and mel.max() > 0


def test_log_mel_equals_librosa():
    """audio.log_mel computes Wav2Lip's features with numpy; librosa's STFT and mel bank are the reference."""
    librosa = pytest.importorskip("librosa")
    basis = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=audio.N_FFT, n_mels=audio.N_MELS, fmin=audio.FMIN,
                                fmax=audio.FMAX)
    assert np.abs(audio.mel_basis() - basis).max() < 1e-7
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(audio.SAMPLE_RATE * 2) * np.sin(np.linspace(0, 20, audio.SAMPLE_RATE * 2)))
    wav = wav.astype(np.float32)
    pad = audio.N_FFT // 2
    frames = 1 + len(wav) // audio.HOP_LENGTH
    track = audio._pre_emphasised(wav, -pad, (frames - 1) * audio.HOP_LENGTH + audio.N_FFT - pad)
    spec = np.abs(librosa.stft(track, n_fft=audio.N_FFT, hop_length=audio.HOP_LENGTH, center=False))
    mel_db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - audio.REF_LEVEL_DB
    expected = np.clip(8 * (mel_db - audio.MIN_LEVEL_DB) / -audio.MIN_LEVEL_DB - 4, -4, 4)
    assert np.abs(audio.log_mel(wav) - expected).max() < 1e-4


def test_envelope_rises_with_loudness():
    wav = np.zeros(audio.SAMPLE_RATE, np.float32)
    wav[8000:] = 0.5
    env = audio.envelope(wav, np.array([0.1, 0.9]))
    assert env[0] == 0 and env[1] == pytest.approx(0.5, rel=1e-3)


def test_pingpong_schedule():
    assert pingpong(10, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert pingpong(3, 5).tolist() == [0, 1, 2]
    assert pingpong(4, 1).tolist() == [0, 0, 0, 0]


def test_closed_mouth_identity_is_the_most_closed_mouth_in_a_typical_pose():
    faces = synthetic_landmarks(6)
    for t, opening in enumerate([12.0, 3.0, 0.5, 8.0, 0.0, 6.0]):
        faces[t, [66, 67, 65]] = faces[t, [62, 61, 63]] + [0.0, opening]  # lower inner lip below the upper
    faces[4] = faces[4] * [0.6, 1.0] + [80.0, 0.0]  # the closest mouth, but the face squashed sideways
    transforms = crop_transforms(faces, CropSpec(CROP_BOX, 128))
    assert closed_mouth_frame(faces, transforms) == 2
    transforms[2] = np.nan  # no face there
    assert closed_mouth_frame(faces, transforms) == 1


@pytest.mark.parametrize("kind", [CROP_FACE, CROP_LIPS, CROP_BOX])
def test_crop_transform_maps_stable_points_to_template(kind):
    spec = CropSpec(kind, 128)
    landmarks = synthetic_landmarks(angle=0.3 if kind != CROP_BOX else 0.0, scale=1.4)
    matrix = crop_transforms(landmarks, spec)[5]
    mapped = transform_points(stable_points(landmarks[5]), matrix)
    if kind == CROP_FACE:
        assert np.allclose(mapped, TEMPLATE * 128, atol=1.5)
    assert np.allclose(inverse_affine(inverse_affine(matrix)), matrix, atol=1e-4)


def test_affines_compose_and_invert_in_batches():
    rng = np.random.default_rng(0)
    outer, inner = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
    points = rng.normal(size=(4, 5, 2))
    composed = compose_affine(outer, inner)
    for k in range(4):  # outer after inner, frame by frame
        expected = transform_points(transform_points(points[k], inner[k]), outer[k])
        assert np.allclose(transform_points(points[k], composed[k]), expected, atol=1e-4)
    identity = compose_affine(outer, inverse_affine(outer))
    assert np.allclose(identity, np.tile(np.eye(2, 3), (4, 1, 1)), atol=1e-4)


def test_box_crop_is_unrotated():
    matrix = crop_transforms(synthetic_landmarks(angle=0.4), CropSpec(CROP_BOX, 64))[0]
    assert abs(matrix[0, 1]) < 1e-6 and abs(matrix[1, 0]) < 1e-6


def test_smoothing_reduces_jitter_and_keeps_gaps():
    landmarks = synthetic_landmarks(n=40, jitter=2.0)
    landmarks[20] = np.nan
    spec = CropSpec(CROP_FACE, 96)
    raw = crop_transforms(landmarks, spec, smooth=False)
    smooth = crop_transforms(landmarks, spec)
    assert np.isnan(smooth[20]).all()
    steps = lambda m: np.nanmean(np.abs(np.diff(m[:, :, 2], axis=0)))
    assert steps(smooth) < 0.6 * steps(raw)


def test_paste_back_identity_is_exact_and_change_stays_in_mask():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    landmarks = synthetic_landmarks(n=1, centre=(160, 120), angle=0.2)[0]
    spec = CropSpec(CROP_FACE, 96)
    matrix = crop_transforms(landmarks[None], spec)[0]
    crop = warp_crop(frame, matrix, spec.size)
    mask = lower_face_mask(transform_points(landmarks, matrix), spec.size)
    assert np.array_equal(paste_back(frame, crop, crop, matrix, mask), frame)
    changed = crop.copy()
    changed[:] = 255
    out = paste_back(frame, crop, changed, matrix, mask, colour_match=False)
    diff = np.abs(out.astype(int) - frame).sum(-1) > 0
    assert diff.any()
    footprint = cv2_warp_mask(mask, matrix, frame.shape)
    assert not diff[footprint == 0].any()  # nothing outside the mask's footprint moved


def cv2_warp_mask(mask, matrix, shape):
    import cv2

    return cv2.warpAffine(mask, inverse_affine(matrix), (shape[1], shape[0]))


def test_border_mask_and_colour_match():
    mask = border_mask(50)
    assert mask[25, 25] == 1 and mask[0, 25] == 0
    src = np.full((8, 8, 3), 100, np.float32) + np.arange(8)[:, None, None]
    gen = src * 0.9 + 30
    matched = match_colour(gen, src, np.ones((8, 8), np.float32))
    assert np.allclose(matched.mean((0, 1)), src.mean((0, 1)), atol=1e-3)


WIDTH = 3


class Tiny(SelfDescribing):
    name = "tiny"

    def __init__(self, width=WIDTH, depth: int = 1, **extra):
        super().__init__()
        self.layer = torch.nn.Linear(width, 2)


class TinyChild(Tiny):
    name = "tiny_child"

    def __init__(self, scale: float = 2.0):
        super().__init__(width=4)


def test_checkpoint_captures_every_constructor_argument(tmp_path):
    model = Tiny(5, colour="red")
    assert model.init_kwargs == {"width": 5, "depth": 1, "colour": "red"}  # defaults and **extra too
    assert TinyChild().init_kwargs == {"scale": 2.0}  # the outermost constructor is what rebuilds it
    path = tmp_path / "m.pt"
    save_model(model, path, meta={"steps": 7}, half=True)
    package = load_package(path)
    assert package["name"] == "tiny" and package["kwargs"] == {"width": 5, "depth": 1, "colour": "red"}
    assert package["meta"]["state_sha256"] == state_sha256(package["state"])
    loaded = load_model(path, {"tiny": Tiny})
    assert loaded.meta["steps"] == 7 and loaded.init_kwargs == model.init_kwargs
    assert torch.allclose(loaded.layer.weight, model.layer.weight, atol=1e-2)


def test_format_1_checkpoints_still_load(tmp_path):
    """Files written before checkpoints carried registry names are found by class name."""
    model = Tiny(5)
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "class": "Tiny", "kwargs": {"width": 5}, "state": model.state_dict(), "meta": {}}, path)
    assert load_model(path, {"tiny": Tiny}).init_kwargs == {"width": 5, "depth": 1}


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DubberError, match="bad.pt"):
        load_package(bad)


def test_iter_frames_reads_sparse_frames_in_one_pass_as_a_seek_each_would(tmp_path):
    """Frames a few apart (a mouth bank's every n-th frame) come from one decode, the ones between
    dropped: the same pixels as one seek per frame, in the order asked (mixed with runs and a
    backwards run)."""
    import helpers
    from dubber import media

    video = helpers.make_face_video(tmp_path / "v.mp4", 2.0)
    info = media.probe(video)
    wanted = [0, 3, 4, 9, 20, 21, 22, 30, 49, 45, 44, 43, 1]
    frames = list(media.iter_frames(info, wanted))
    alone = [next(iter(media.VideoReader(info, start=k, count=1))) for k in wanted]
    assert len(frames) == len(wanted)
    assert all(np.array_equal(a, b) for a, b in zip(frames, alone))
    assert not np.array_equal(frames[0], frames[1])  # a moving face: the frames do differ
