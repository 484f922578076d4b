"""The two-stage rewrite backbone (dubber.backbones.rewrite + dubber.mouthbank): the audio -> mouth
shape network, its recipe through the one training loop (the shape error falls below a still
mouth's on held-out synthetic speakers, checkpoints round-trip), the bank's retrieval by predicted
shape with the evaluation's exclusion window, and `dubber lipsync --backbone rewrite` end to end
with a tiny trained file (a video dubs from its own mouths; a photo is refused in one line)."""

import numpy as np
import pytest
import torch

import helpers
from dubber.backbones import load_backbone
from dubber.backbones.rewrite import MOTION_MEL_WIDTH, MOUTH_POINTS, SMOOTH_SIGMA, Rewrite, _smooth_time
from dubber.checkpoint import save_model
from dubber.face.landmarks import MOUTH
from dubber.face.landmarks import centred_mouth as centred
from dubber.mouthbank import MouthBank
from dubber.train.loop import train
from dubber.train.recipes import recipe_for
from dubber.face.landmarks import inner_opening
from dubber.train.recipes.rewrite import LANDMARK_CROP, mirrored, mouth_shapes

torch.set_num_threads(1)
KEY = LANDMARK_CROP.key  # the synthetic landmarks are in this crop's pixels


def _mouth(opening: float, width: float = 30.0) -> np.ndarray:
    """20 mouth points [20, 2] in dlib order (outer 48-59 clockwise from the left corner, inner
    60-67), `opening` pixels open, centred on (64, 80)."""
    angles = np.linspace(np.pi, -np.pi, 13)[:12]  # left corner, over the top, back along the bottom
    outer = np.stack([np.cos(angles) * width / 2, -np.sin(angles) * (4 + opening / 2)], 1)
    inner_angles = np.linspace(np.pi, -np.pi, 9)[:8]
    inner = np.stack([np.cos(inner_angles) * width / 3, -np.sin(inner_angles) * opening / 2], 1)
    return (np.concatenate([outer, inner]) + (64, 80)).astype(np.float32)


def synthetic_clip(identity: str, frames: int, seed: int) -> dict:
    """A speaker whose mouth opening follows the low mel bands' energy, in the layout of
    dubber.data.load_clips (landmarks in crop pixels: identity transforms)."""
    rng = np.random.default_rng(seed)
    openness = np.clip(np.convolve(rng.uniform(0, 1, frames + 8), np.ones(9) / 9, "valid"), 0, 1)  # syllables, not frames
    landmarks = np.zeros((frames, 68, 2), np.float32)
    width = rng.uniform(26, 36)  # each person's own mouth
    landmarks[:, MOUTH] = np.stack([_mouth(12 * o, width) for o in openness])
    mels = np.full((frames, 80, MOTION_MEL_WIDTH), -4.0, np.float32)
    mels[:, :40] += 8 * openness[:, None, None].astype(np.float32)
    mels += rng.normal(0, 0.3, mels.shape).astype(np.float32)
    return {"mels": mels, "identity": identity, "name": f"{identity}-{seed}", "speech": np.ones(frames, bool),
            "landmarks": landmarks, "transforms": {KEY: np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1))},
            "openness": openness}


def test_forward_shapes_and_size():
    model = Rewrite().eval()
    assert model.returns_points and model.mel_width == MOTION_MEL_WIDTH
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    with torch.no_grad():
        out = model(None, torch.randn(2, 3, 1, 80, MOTION_MEL_WIDTH))
    assert out.images is None and out.points.shape == (2, 3, MOUTH_POINTS, 2)


def test_shapes_are_smoothed_along_time_within_a_window():
    steady = torch.ones(1, 16, MOUTH_POINTS, 2)
    assert torch.allclose(_smooth_time(steady, SMOOTH_SIGMA), steady)  # edges replicated: nothing leaks in
    spike = torch.zeros(1, 16, MOUTH_POINTS, 2)
    spike[0, 8] = 1.0
    smoothed = _smooth_time(spike, SMOOTH_SIGMA)
    assert torch.isclose(smoothed.sum(1), torch.ones(1, MOUTH_POINTS, 2)).all()  # spread, not lost
    assert smoothed[0, 8, 0, 0] < 0.3 and smoothed[0, 6, 0, 0] > 0.1


def test_shape_targets_mirror_and_opening():
    clip = synthetic_clip("a", 30, seed=0)
    shapes = mouth_shapes(clip)
    assert shapes.shape == (30, 20, 2) and np.allclose(shapes.mean(0), 0, atol=1e-4)  # deviation from the mean
    assert np.allclose(shapes.mean(1), 0, atol=1e-4)  # each frame about its own centroid
    # the inner opening follows the synthetic openness (it is 12 * openness, less the mean)
    assert np.corrcoef(inner_opening(clip["mouth_mean"] + shapes), clip["openness"])[0, 1] > 0.99
    lopsided = centred(_mouth(5.0))
    lopsided[0, 0] -= 3  # the left corner pulled out
    flipped = mirrored(lopsided)
    assert np.isclose(flipped[6, 0], -lopsided[0, 0])  # the left corner (48) becomes the right (54)
    assert np.allclose(mirrored(flipped), lopsided) and np.isclose(inner_opening(flipped), inner_opening(lopsided))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A rewrite file trained 150 steps (batch 64) on four synthetic speakers, validated on two others
    (motion gain 1: a synthetic speaker's motion is all in the sound, nothing to make up for)."""
    out = tmp_path_factory.mktemp("rewrite") / "rewrite.pt"
    clips = [synthetic_clip(f"person{k}", 80, seed=k) for k in range(4)]
    val = [synthetic_clip(f"held{k}", 80, seed=10 + k) for k in range(2)]
    history = train(recipe_for("rewrite", batch_size=64, motion_gain=1.0), clips, out, 150, val_clips=val, val_every=75,
                    log_every=10, log=lambda message: None)
    return out, history, val


def test_training_learns_shapes_on_unseen_speakers(trained):
    out, history, _ = trained
    losses = [entry["l1"] for entry in history if "l1" in entry]
    assert losses[-1] < 0.5 * losses[0], history
    model = load_backbone("rewrite", out)
    figures = model.meta["validation"]
    assert figures["val_shape_error"] < 0.4 * figures["val_still_error"], figures
    assert figures["val_opening_corr"] > 0.9, figures


def test_checkpoint_round_trip(trained, tmp_path):
    out, _, _ = trained
    model = load_backbone("rewrite", out)
    assert model.meta["steps"] == 150 and model.meta["recipe"]["name"] == "rewrite"
    again = tmp_path / "again.pt"
    save_model(model, again)
    mels = torch.randn(1, 4, 1, 80, MOTION_MEL_WIDTH)
    with torch.no_grad():
        assert torch.equal(model(None, mels).points, load_backbone("rewrite", again)(None, mels).points)


def _bank(openings) -> MouthBank:
    n = len(openings)
    crops = np.zeros((n, 128, 128, 3), np.uint8)
    crops[:, 0, 0, 0] = np.arange(n)  # each entry's crop says which it is
    return MouthBank(crops, np.stack([_mouth(o) for o in openings]), np.arange(n))


def test_render_shape_takes_the_closest_real_mouth():
    bank = _bank([0, 3, 6, 9, 12])
    deviation = centred(_mouth(9.2)) - bank.mean_shape  # what the network predicts for that mouth
    assert bank.render_shape(deviation)[0, 0, 0] == 3


def test_exclusion_keeps_the_dubbed_frames_own_mouth_out():
    """Evaluation on the video itself: the mouth at (and round) the frame being dubbed is the answer."""
    bank = _bank([0, 3, 6, 9, 12, 9.5, 3, 0])
    bank.exclude_radius = 1
    target = centred(_mouth(9.0)) - bank.mean_shape
    assert bank.render_shape(target, frame=3)[0, 0, 0] == 5  # 9.5 at frame 5, not the excluded 9 at frame 3
    bank.reset()
    assert bank.render_shape(target)[0, 0, 0] == 3  # no frame given: nothing excluded
    tiny = _bank([0, 9])
    tiny.exclude_radius = 10  # a video shorter than the window keeps its farthest frame
    assert tiny.render_shape(target, frame=1)[0, 0, 0] == 0


def test_lipsync_end_to_end(trained, face_video, speech_1s, tmp_path):
    """`dubber lipsync --backbone rewrite` on a video: the audio's length, every frame's lower face
    one of the video's own (changes only round the mouth)."""
    weights, _, _ = trained
    out = tmp_path / "out.mp4"
    code, stdout, stderr = helpers.run_cli(["lipsync", face_video, speech_1s, "-o", out, "--backbone", "rewrite",
                                            "--weights", weights, "--device", "cpu", "--quiet"])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    frames, source = helpers.decode_frames(out), helpers.decode_frames(face_video)
    assert len(frames) == 25
    height, moved = frames[0].shape[0], 0
    for t in range(25):
        rows, _ = np.nonzero(np.abs(frames[t].astype(np.float32) - source[t].astype(np.float32)).max(-1) > 25)
        assert rows.size == 0 or rows.min() > height * 0.3, "changes above the mouth: the paste leaked"
        moved += rows.size > 0
    assert moved >= 1, "the video's own mouths were not pasted"


def test_lipsync_photo_is_refused(trained, face_still, speech_1s, tmp_path):
    weights, _, _ = trained
    code, _, stderr = helpers.run_cli(["lipsync", face_still, speech_1s, "-o", tmp_path / "o.mp4",
                                       "--backbone", "rewrite", "--weights", weights])
    line = stderr.strip()
    assert code == 2 and line.startswith("error: ") and "\n" not in line, stderr
    assert "--backbone" in line and "dck" in line and "--mouth-bank-source" in line, line
    assert list(tmp_path.iterdir()) == []


def test_temporal_variant_trains_on_runs_of_frames(tmp_path):
    """temporal > 0: the recipe draws runs of frames and the file rebuilds the temporal layers."""
    clips = [synthetic_clip(f"person{k}", 40, seed=k) for k in range(2)]
    out = tmp_path / "rewrite.pt"
    history = train(recipe_for("rewrite", batch_size=64, temporal=1), clips, out, 3, log_every=1,
                    log=lambda message: None)
    assert all(np.isfinite(entry["l1"]) for entry in history if "l1" in entry)
    model = load_backbone("rewrite", out)
    assert model.init_kwargs["temporal"] == 1 and len(model.temporal) == 1
    with torch.no_grad():
        assert model(None, torch.randn(1, 16, 1, 80, MOTION_MEL_WIDTH)).points.shape == (1, 16, MOUTH_POINTS, 2)


def test_motion_gain_scales_the_motion_at_inference_only():
    """Training fits the real motion; dubbing moves the mouth motion_gain times as far."""
    torch.manual_seed(0)
    plain, scaled = Rewrite(motion_gain=1.0), Rewrite(motion_gain=1.6)
    scaled.load_state_dict(plain.state_dict())
    mels = torch.randn(1, 4, 1, 80, MOTION_MEL_WIDTH)
    with torch.no_grad():
        assert torch.allclose(scaled.eval()(None, mels).points, 1.6 * plain.eval()(None, mels).points, atol=1e-5)
        plain.train(), scaled.train()
        torch.manual_seed(1)
        a = plain(None, mels).points
        torch.manual_seed(1)
        assert torch.allclose(scaled(None, mels).points, a)  # same dropout draw, no gain


def test_spec_augment_hides_one_run_of_bands_and_one_of_frames_per_sample():
    from dubber.audio import MEL_MIN
    from dubber.train.augment import spec_augment

    mels = np.zeros((64, 2, 80, MOTION_MEL_WIDTH), np.float32)
    out = spec_augment(mels, np.random.default_rng(0), 16, 8)
    assert np.array_equal(mels, np.zeros_like(mels))  # the input is not changed
    hidden = out == MEL_MIN
    assert np.array_equal(hidden[:, 0], hidden[:, 1])  # the frames of one sample share the draw
    bands = hidden[:, 0].all(axis=2).sum(1)  # bands hidden over every mel frame
    frames = hidden[:, 0].all(axis=1).sum(1)
    assert bands.max() <= 16 and frames.max() <= 8 and bands.min() == 0 and bands.mean() > 4
    assert np.array_equal(spec_augment(mels, np.random.default_rng(0), 0, 0), mels)
