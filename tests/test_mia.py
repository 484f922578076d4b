"""MIA and AMIE (dubber.backbones.mia) and their recipes: the stateful contract (the previous frame
fed back, carried by the runner across windows), the mutual-information bounds and the dynamic
attention schedule, training through the one loop (every loss computed, the reconstruction falls,
resume is exact, the ablation switches), and `dubber lipsync --backbone amie` end to end with a
tiny trained file (no shipped weights needed)."""

import numpy as np
import pytest
import torch

import helpers
from dubber.apply import Generator, Step, apply_backbone
from dubber.backbones import CROP_BOX, CropSpec, load_backbone
from dubber.backbones.mia import AMIE, MIA, SIZE, WINDOW
from dubber.errors import DubberError
from dubber.train.loop import train
from dubber.train.recipes import recipe_for
from dubber.train.recipes.mia import (ATTENTION_LOW, ATTENTION_START, attention_rate, dv_estimate, js_estimate,
                                      mouth_region)

torch.set_num_threads(1)
BOX = CropSpec(CROP_BOX, SIZE).key
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def clips():
    return [helpers.synthetic_box_clip(f"id{i}", 24, i) for i in range(3)]


@pytest.fixture(scope="module")
def model() -> MIA:
    torch.manual_seed(0)
    return MIA().eval()


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    """An amie file trained for 6 steps of the full recipe (every loss on from the start)."""
    out = tmp_path_factory.mktemp("amie") / "amie.pt"
    recipe = recipe_for("amie", batch_size=2, ae_steps=2, adv_start=0)
    history = train(recipe, clips, out, 6, log_every=3, log=lambda message: None)
    return out, history


def test_declares_the_stateful_contract():
    for cls in (MIA, AMIE):
        assert cls.stateful and cls.window == WINDOW and cls.overlap == 0 and cls.conditioning == "closed_mouth"
        assert cls.crop.key == BOX and not cls.returns_alpha
    assert AMIE.name == "amie" and MIA.name == "mia"


def test_the_previous_frame_is_fed_back(model):
    """Without a state the first frame is drawn from the identity face as its previous frame; a
    state changes the output; the returned state is the last frame."""
    torch.manual_seed(1)
    mels, identity = torch.randn(1, 3, 1, 80, 16), torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        fresh = model(None, mels, identity)
        same = model(None, mels, identity, state=identity)
        other = model(None, mels, identity, state=torch.rand(1, 3, SIZE, SIZE))
    assert fresh.images.shape == (1, 3, 3, SIZE, SIZE)
    assert torch.equal(fresh.images, same.images)
    assert not torch.allclose(fresh.images, other.images)
    assert torch.equal(fresh.state, fresh.images[:, -1])
    # frame t is drawn from frame t-1: running on from the state gives the same next frames
    with torch.no_grad():
        first, rest = model(None, mels[:, :1], identity), None
        rest = model(None, mels[:, 1:], identity, state=first.state)
    assert torch.allclose(torch.cat([first.images, rest.images], 1), fresh.images, atol=1e-6)


def test_the_runner_carries_the_state_across_windows(model):
    frames = 2 * WINDOW + 3
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (frames, SIZE, SIZE, 3), np.uint8)
    mels = rng.normal(size=(frames, 80, 16)).astype(np.float32)
    identity = crops[0]
    generator = Generator(model, torch.device("cpu"))
    out = np.stack([g for _, _, g in apply_backbone(generator, (Step(c, m) for c, m in zip(crops, mels)), identity)])
    with torch.no_grad():
        whole = model(None, torch.from_numpy(mels)[None, :, None],
                      torch.from_numpy(identity[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255).images[0]
    expected = (whole.permute(0, 2, 3, 1).numpy()[..., ::-1] * 255).round()
    assert out.shape == (frames, SIZE, SIZE, 3)
    assert np.abs(out.astype(np.float32) - expected).max() <= 1


def test_every_anchor_has_an_identity_face_far_enough():
    """sequence_anchors gives exactly the starts where distant_frame finds a frame `gap` away from
    the whole run (the recipes of MIA/AMIE, CRAN and DCK draw their identity faces so)."""
    from dubber.train.sampler import distant_frame, sequence_anchors

    rng = np.random.default_rng(0)
    for span, gap in ((1, 5), (3, 5), (8, 5)):
        for length in range(span, span + 2 * gap + 3):
            starts = sequence_anchors(length, span, gap)
            assert (len(starts) > 0) == (length >= span + 2 * gap - 1)
            for start in starts:
                for _ in range(5):
                    frame = distant_frame(length, start, span, gap, rng)
                    assert min(abs(frame - t) for t in range(start, start + span)) >= gap


def test_mutual_information_bounds():
    joint, marginal = torch.full((64,), 5.0), torch.full((64,), -5.0)
    assert js_estimate(joint, marginal) > -0.02  # separable pairs: the bound reaches its top, 0 (nats, shifted)
    assert js_estimate(torch.zeros(64), torch.zeros(64)) == pytest.approx(-2 * np.log(2), abs=1e-6)
    scores = torch.randn(8)
    assert dv_estimate(scores, scores) == pytest.approx((scores.mean() - scores.exp().mean().log()).item(), abs=1e-5)


def test_dynamic_attention_schedule_and_masks():
    assert attention_rate(0) == pytest.approx(ATTENTION_START)
    assert attention_rate(10_000, low_at=100, full_at=20_000) == pytest.approx(ATTENTION_LOW)
    assert ATTENTION_LOW < attention_rate(50, low_at=100, full_at=200) < ATTENTION_START
    assert attention_rate(200, low_at=100, full_at=200) == 1.0
    points = np.stack([np.linspace(40, 88, 20), np.r_[np.full(10, 80.0), np.full(10, 90.0)]], 1)
    box, outline = mouth_region(points, SIZE, "box"), mouth_region(points, SIZE, "outline")
    assert box[85, 64] == 1 and box[10, 64] == 0 and box.sum() > outline.sum() * 0.9
    assert 0 < outline[85, 64] <= 1 and outline[10, 10] == 0


def test_training_computes_every_loss(trained):
    _, history = trained
    assert {"ae", "mouth", "frame", "gan", "dis", "mi_generated", "mi_t", "rate"} <= set(history[0])
    assert "perc" in history[-1]


def test_reconstruction_falls(clips, tmp_path):
    recipe = recipe_for("mia", batch_size=2, lr=1e-3, lambda_gan=0.0, lambda_mi=0.0, lambda_perc=0.0, ae_steps=0)
    losses = train(recipe, clips, tmp_path / "m.pt", 24, log_every=6, log=lambda message: None)
    assert losses[-1]["frame"] < 0.75 * losses[0]["frame"], losses


def test_checkpoint_round_trip(trained, tmp_path):
    path, _ = trained
    assert path.stat().st_size < MAX_SHIPPED_BYTES
    model = load_backbone("amie", path)
    assert isinstance(model, AMIE) and model.meta["steps"] == 6 and model.meta["recipe"]["attention"] == "outline"
    with pytest.raises(DubberError, match="not 'mia'"):
        load_backbone("mia", path)


def test_resume_is_exact(clips, tmp_path):
    helpers.assert_resume_is_exact(recipe_for("mia", batch_size=2, ae_steps=1, adv_start=1), clips, tmp_path)


@pytest.mark.parametrize("switch, present, absent", [
    ({"estimator": "mine"}, "mi_t", None),
    ({"estimator": "none"}, "gan", "mi_t"),
    ({"attention": "none"}, "gan", None),
])
def test_ablation_switches(clips, tmp_path, switch, present, absent):
    recipe = recipe_for("mia", batch_size=2, ae_steps=0, adv_start=0, **switch)
    history = train(recipe, clips, tmp_path / "m.pt", 1, log_every=1, log=lambda message: None)
    assert present in history[0] and (absent is None or absent not in history[0])
    if switch.get("attention") == "none":
        assert history[0]["rate"] == 1.0


def test_unknown_estimator_is_refused(tmp_path):
    with pytest.raises(DubberError, match="estimator"):
        recipe_for("mia", estimator="kl")
    with pytest.raises(DubberError, match="batch_size must be at least 2"):
        recipe_for("amie", batch_size=1)
    code, _, stderr = helpers.run_cli(["train", "--backbone", "mia", "--data", tmp_path, "--set", "estimator=kl"])
    assert code == 2 and stderr.startswith("error: --set estimator=kl: estimator must be one of"), stderr


@pytest.mark.parametrize("kind", ["video", "photo"])
def test_lipsync_end_to_end(trained, face_video, face_still, speech_1s, tmp_path, kind):
    weights, _ = trained
    face = face_video if kind == "video" else face_still
    out = tmp_path / "out.mp4"
    code, _, stderr = helpers.run_cli_subprocess(
        ["lipsync", face, speech_1s, "-o", out, "--backbone", "amie", "--weights", weights, "--quiet"])
    assert code == 0, stderr
    assert len(helpers.decode_frames(out)) == 25
