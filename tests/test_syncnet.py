"""The SyncNet sync expert and its recipe: shapes, offset search, a synthetic sync task it must
learn through the one training loop, checkpoints, resume."""

import math

import numpy as np
import pytest
import torch

import helpers
from dubber.audio import MEL_WINDOW as MEL_WIDTH
from dubber.backbones import load
from dubber.backbones.syncnet import MOUTH_H, MOUTH_W, SyncNet, mouths_from_faces
from dubber.eval.sync import offset_distances, sync_scores
from dubber.train.loop import checkpoint_path_for, train
from dubber.train.recipes import recipe_for
from dubber.train.recipes.syncnet import WINDOWS_PER_SEGMENT, offset_choice_loss
from dubber.train.sampler import IdentitySampler

torch.set_num_threads(1)

MEL_PER_FRAME = 80 / 25  # mel frames per video frame at 25 fps
TINY = dict(base_channels=8, embed_dim=32)
TRAIN_STEPS = 100


def synthetic_clip(rng, frames, identity, mouth_lag=0):
    """A mouth whose opening height and width follow two band energies of the audio.

    mouth_lag > 0: the mouth moves that many frames after the sound. Energies are drawn per video
    frame; the mel "spectrogram" holds band energy 0 in its low 40 bands and energy 1 in the high
    40, at 80 mel frames/s, cut into windows centred on each frame as dubber.audio.mel_windows does.
    """
    energy = rng.random((2, frames + 40))
    sound = energy[:, 20:20 + frames]
    mouth = energy[:, 20 - mouth_lag:20 - mouth_lag + frames]
    mel_frames = int(frames * MEL_PER_FRAME) + 1
    level = sound[:, np.minimum((np.arange(mel_frames) / MEL_PER_FRAME).astype(int), frames - 1)]
    mel = np.repeat(level, 40, axis=0) * 7 - 4 + rng.normal(0, 0.3, (80, mel_frames))
    padded = np.pad(mel, ((0, 0), (MEL_WIDTH // 2, MEL_WIDTH)), constant_values=-4.0)
    centres = np.round(np.arange(frames) * MEL_PER_FRAME).astype(int)
    mels = np.stack([padded[:, c:c + MEL_WIDTH] for c in centres]).astype(np.float32)

    skin = 150 + 0.5 * np.random.default_rng(sum(map(ord, identity))).integers(0, 120, (MOUTH_H, MOUTH_W, 3))
    mouths = np.repeat(skin[None], frames, axis=0)
    for t in range(frames):
        height, width = int(round(2 + 30 * mouth[0, t])), int(round(30 + 50 * mouth[1, t]))
        top, left = MOUTH_H // 2 - height // 2, MOUTH_W // 2 - width // 2
        mouths[t, top:top + height, left:left + width] = 30
    mouths = np.clip(mouths + rng.normal(0, 8, mouths.shape), 0, 255).astype(np.uint8)
    faces = np.concatenate([np.full_like(mouths, 128), mouths], axis=1)  # the mouth is the face's lower half
    return {"crops": {"face96": faces}, "mels": mels, "identity": identity, "name": identity,
            "speech": np.ones(frames, bool)}


RECIPE = dict(batch_size=32, lr=3e-3, **TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    # One identity owns 90 % of the clips, as in the real data.
    clips = [synthetic_clip(rng, 40, "anna" if i < 9 else "bert") for i in range(10)]
    out = tmp_path_factory.mktemp("syncnet") / "syncnet.pt"
    logs = []
    train(recipe_for("syncnet", **RECIPE), clips, out, steps=TRAIN_STEPS, log_every=TRAIN_STEPS,
          checkpoint_every=TRAIN_STEPS // 2, log=logs.append)
    return load("syncnet", out), out, clips, logs


def test_shapes():
    model = SyncNet(**TINY)
    windows, mels = torch.rand(3, 15, MOUTH_H, MOUTH_W), torch.randn(3, 1, 80, MEL_WIDTH)
    face, audio = model.embed_face(windows), model.embed_audio(mels)
    assert face.shape == audio.shape == (3, 32)
    assert torch.allclose(face.norm(dim=1), torch.ones(3), atol=1e-5)
    probability = model(windows, mels)  # the expert's P(in sync), as a generator's sync loss uses it
    assert probability.shape == (3,) and ((probability >= 0) & (probability <= 1)).all()
    assert torch.allclose(probability, (1 + (face * audio).sum(dim=1)) / 2, atol=1e-5)
    with pytest.raises(ValueError):
        model.embed_face(torch.rand(3, 3, MOUTH_H, MOUTH_W))


def _clock_clip(frames, mouth_lag):
    mouth_frame = np.arange(frames) - mouth_lag  # frame t shows the mouth of audio frame t - lag
    mouths = np.repeat(mouth_frame + 20, MOUTH_H * MOUTH_W * 3).reshape(frames, MOUTH_H, MOUTH_W, 3)
    mels = np.repeat(np.arange(frames) + 20.0, 80 * MEL_WIDTH).reshape(frames, 80, MEL_WIDTH)
    return mouths.astype(np.uint8), mels.astype(np.float32)


@pytest.mark.parametrize("mouth_lag", [0, 3, -4])
def test_offset_search_indexing_and_sign(mouth_lag):
    mouths, mels = _clock_clip(40, mouth_lag)
    distances = offset_distances(helpers.ClockExpert(), mouths, mels)
    assert distances.shape == (36, 31)
    assert np.isnan(distances[0, 0]) and np.isnan(distances[-1, -1])  # audio frames outside the clip
    # Column o is audio shift o - 15; a mouth lag L is found at shift -L where that audio exists.
    middles = np.arange(36) + 2
    inside = (middles - mouth_lag >= 0) & (middles - mouth_lag < 40)
    assert (np.nanargmin(distances, axis=1)[inside] == 15 - mouth_lag).all()
    scores = sync_scores(helpers.ClockExpert(), mouths, mels, expected_offset=mouth_lag)
    assert scores["offset"] == mouth_lag  # positive: the mouth moves after the sound
    assert scores["offset_accuracy"] >= inside.mean()
    assert scores["lse_d"] == pytest.approx(0.0, abs=1e-4)
    assert scores["lse_c"] > 0.5


def test_offset_choice_loss_values():
    eye = torch.eye(6)
    face = eye[[0, 2]]  # window b is spoken with audio row 2b exactly
    audio = eye
    target = torch.tensor([0, 2])
    # At temperature 1 each window has logit 1 for its own row and 0 for the 5 others.
    expected = -math.log(math.e / (math.e + 5))
    assert offset_choice_loss(face, audio, target, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    exclude = torch.ones(2, 6, dtype=torch.bool)
    exclude[0, 0] = exclude[1, 2] = False
    assert offset_choice_loss(face, audio, target, exclude).item() == pytest.approx(0.0, abs=1e-6)
    # Window 0 told its audio is row 1 while row 0 (cosine 1, logit 1 / 0.2) is still a candidate:
    # -log(e^0 / (e^5 + e^0)); window 1 has only its own row left (loss 0).
    exclude[0, 1] = False
    expected = math.log(1 + math.exp(5)) / 2
    assert offset_choice_loss(face, audio, torch.tensor([1, 2]), exclude).item() == pytest.approx(expected, rel=1e-5)


def test_segment_sampler_targets_and_near_misses():
    rng = np.random.default_rng(0)
    clips = [synthetic_clip(rng, 40, "anna"), synthetic_clip(rng, 50, "bert")]
    recipe = recipe_for("syncnet", batch_size=3 * WINDOWS_PER_SEGMENT)
    sampler = IdentitySampler(clips, recipe.anchors, recipe.identity_power)
    windows, mels, target, exclude = recipe.segments(sampler, np.random.default_rng(1))
    for clip in clips:
        clip["mouths"] = mouths_from_faces(clip["crops"]["face96"])
    assert windows.shape == (3 * WINDOWS_PER_SEGMENT, 5, MOUTH_H, MOUTH_W, 3)
    assert exclude.shape == (len(windows), len(mels)) and not exclude[np.arange(len(target)), target].any()
    # Each window's target row holds the mel window of its middle frame; the rows a frame either
    # side of it (same clip, same segment) are excluded, the ones two frames away are negatives.
    for b in range(len(windows)):
        clip = next(c for c in clips if any((c["mouths"][t:t + 5] == windows[b]).all()
                                            for t in range(len(c["mouths"]) - 4)))
        middle = next(t for t in range(2, len(clip["mouths"]) - 2) if (clip["mouths"][t - 2:t + 3] == windows[b]).all())
        assert np.array_equal(mels[target[b]], clip["mels"][middle])
        for step, excluded in ((1, True), (2, False)):
            for row in (target[b] - step, target[b] + step):
                if 0 <= row < len(mels) and any(np.array_equal(mels[row], clip["mels"][middle + s])
                                                for s in (-step, step) if 0 <= middle + s < len(clip["mels"])):
                    assert exclude[b, row] == excluded


def test_mouths_from_faces_takes_lower_half():
    faces = np.zeros((2, 128, 128, 3), np.uint8)
    faces[:, 64:] = 200
    mouths = mouths_from_faces(faces)
    assert mouths.shape == (2, MOUTH_H, MOUTH_W, 3)
    assert (mouths == 200).all()


def test_learns_synthetic_sync(trained):
    model, _, _, logs = trained
    assert model.meta["steps"] == TRAIN_STEPS and not model.training
    for identity, seed in (("anna", 1), ("carl", 2)):  # a seen and an unseen face
        clip = synthetic_clip(np.random.default_rng(seed), 60, identity)
        scores = sync_scores(model, mouths_from_faces(clip["crops"]["face96"]), clip["mels"])
        assert scores["offset"] == 0
        assert scores["offset_accuracy"] > 0.6, (identity, scores)  # chance: 3 of 31 offsets
    late = synthetic_clip(np.random.default_rng(3), 60, "anna", mouth_lag=3)
    assert sync_scores(model, mouths_from_faces(late["crops"]["face96"]), late["mels"])["offset"] == 3


def test_checkpoint_round_trip_and_resume(trained):
    model, out, clips, logs = trained
    package = torch.load(out, weights_only=True)
    assert package["name"] == "syncnet" and package["kwargs"] == TINY
    assert {"data", "steps", "hardware", "date", "recipe", "state_sha256"} <= set(package["meta"])
    loaded = load("syncnet", out)
    x, m = torch.rand(2, 15, MOUTH_H, MOUTH_W), torch.randn(2, 1, 80, MEL_WIDTH)
    with torch.no_grad():
        assert torch.allclose(loaded.embed_face(x), model.embed_face(x), atol=1e-6)
        assert torch.allclose(loaded.embed_audio(m), model.embed_audio(m), atol=1e-6)
    assert checkpoint_path_for(out).is_file()
    resumed_logs = []
    train(recipe_for("syncnet", **RECIPE), clips, out, steps=TRAIN_STEPS + 1, log_every=1, log=resumed_logs.append)
    assert resumed_logs[0].startswith("resumed") and f"at step {TRAIN_STEPS}" in resumed_logs[0]
    assert resumed_logs[1].startswith(f"step {TRAIN_STEPS + 1}/")
