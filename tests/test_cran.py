"""CRAN (dubber.backbones.cran) and its recipe: the recurrent state along the frames and across the
runner's windows, training through the one loop (reconstruction first, then the image, video and
lip-reading critics; the loss falls; resume is exact; the ablation switches), the lip-reading
critic's view of generated crops, and `dubber lipsync --backbone
cran` end to end with a tiny trained file (no shipped weights needed)."""

import numpy as np
import pytest
import torch

import helpers
from dubber.apply import Generator, Step, apply_backbone
from dubber.backbones import load_backbone
from dubber.backbones.cran import CRAN, MEL_WIDTH, SIZE, WINDOW
from dubber.backbones.lipreader import GRID_WORDS, MOUTH_CROP, WORD_FRAMES, grey_mouths, word_frames
from dubber.errors import DubberError
from dubber.face.align import compose_affine, crop_transforms, inverse_affine, warp_crop
from dubber.train.loop import train
from dubber.train.recipes import recipe_for

torch.set_num_threads(1)
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


SPOKEN = [(1, 4, "bin"), (5, 11, "blue"), (14, 20, "at"), (20, 23, "f")]  # (first frame, end frame, word)


@pytest.fixture(scope="module")
def clips():
    """Three clips of 26 frames; two carry aligned words (as GRID's do), one does not (as wild ones)."""
    clips = [helpers.synthetic_box_clip(f"id{i}", 26, i, mel_width=MEL_WIDTH) for i in range(3)]
    for clip in clips[:2]:
        clip["words"] = SPOKEN
    return clips


@pytest.fixture(scope="module")
def model() -> CRAN:
    torch.manual_seed(0)
    return CRAN().eval()


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    """A cran file trained for 4 steps with every loss on."""
    out = tmp_path_factory.mktemp("cran") / "cran.pt"
    history = train(recipe_for("cran", batch_size=2, adv_start=0), clips, out, 4, log_every=2, log=lambda m: None)
    return out, history


def test_declares_the_stateful_contract():
    assert CRAN.stateful and CRAN.window == WINDOW and CRAN.overlap == 0 and CRAN.conditioning == "closed_mouth"
    assert CRAN.mel_width == 28  # the paper's 350 ms of audio a frame


def test_the_recurrent_state_runs_along_the_frames(model):
    torch.manual_seed(1)
    mels, identity = torch.randn(1, 6, 1, 80, MEL_WIDTH), torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        whole = model(None, mels, identity)
        first = model(None, mels[:, :2], identity)
        rest = model(None, mels[:, 2:], identity, state=first.state)
        fresh = model(None, mels[:, 2:], identity)
    assert torch.allclose(torch.cat([first.images, rest.images], 1), whole.images, atol=1e-5)
    # the state carries what came before (an untrained decoder fades it to almost nothing in the images)
    assert (rest.state - fresh.state).abs().max() > 1e-3 and not torch.equal(rest.images, fresh.images)


def test_the_runner_carries_the_state_across_windows(model):
    frames = 2 * WINDOW + 3
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (frames, SIZE, SIZE, 3), np.uint8)
    mels = rng.normal(size=(frames, 80, MEL_WIDTH)).astype(np.float32)
    generator = Generator(model, torch.device("cpu"))
    out = np.stack([g for _, _, g in apply_backbone(generator, (Step(c, m) for c, m in zip(crops, mels)), crops[0])])
    with torch.no_grad():
        whole = model(None, torch.from_numpy(mels)[None, :, None],
                      torch.from_numpy(crops[0][..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255).images[0]
    expected = (whole.permute(0, 2, 3, 1).numpy()[..., ::-1] * 255).round()
    assert np.abs(out.astype(np.float32) - expected).max() <= 1


def test_training_computes_every_loss_and_ships(trained, tmp_path):
    path, history = trained
    assert {"rec", "image", "video", "lip", "d_image", "d_video", "d_lip"} <= set(history[0])
    assert path.stat().st_size < MAX_SHIPPED_BYTES
    model = load_backbone("cran", path)
    assert model.meta["steps"] == 4 and model.meta["recipe"]["lambda_video"] == pytest.approx(1e-2)


def test_reconstruction_falls(clips, tmp_path):
    recipe = recipe_for("cran", batch_size=2, lr=1e-3)  # adv_start 2000: reconstruction alone
    losses = train(recipe, clips, tmp_path / "c.pt", 24, log_every=6, log=lambda m: None)
    assert "image" not in losses[0] and losses[-1]["rec"] < 0.75 * losses[0]["rec"], losses


def test_resume_is_exact(clips, tmp_path):
    helpers.assert_resume_is_exact(recipe_for("cran", batch_size=2, adv_start=1), clips, tmp_path)


@pytest.mark.parametrize("switch, absent", [({"lambda_image": 0.0}, "image"), ({"lambda_video": 0.0}, "video"),
                                            ({"lambda_lip": 0.0}, "lip")])
def test_ablation_switches(clips, tmp_path, switch, absent):
    history = train(recipe_for("cran", batch_size=2, adv_start=0, **switch), clips, tmp_path / "c.pt", 1,
                    log_every=1, log=lambda m: None)
    assert absent not in history[0] and f"d_{absent}" not in history[0] and "rec" in history[0]


def test_the_critic_sees_generated_lips_as_the_lip_reader_sees_real_ones(clips):
    """draw_words + lip_words: a word's frames, warped from the box crops into the lips crop,
    match the lips crops the cache derives (cv2, the same affines), at the word's frames."""
    first, end, word = SPOKEN[1]
    clip = {**clips[0], "words": [SPOKEN[1]]}
    sampler = type("Sampler", (), {"clips": [clip]})()
    recipe = recipe_for("cran", lip_batch=2)
    _, _, frames, labels, _ = recipe.draw_words(sampler, np.random.default_rng(0))
    assert frames.shape == (2, WORD_FRAMES) and [GRID_WORDS[k] for k in labels] == [word, word]
    torch.manual_seed(0)
    fake, real, labels = recipe.lip_words(CRAN(), sampler, np.random.default_rng(0), torch.device("cpu"))
    assert fake.shape == real.shape == (2, WORD_FRAMES, 1, MOUTH_CROP.size, MOUTH_CROP.size) and fake.requires_grad
    lips, box = crop_transforms(clip["landmarks"], MOUTH_CROP), clip["transforms"]["box128"]

    def derived(ts):  # the cache's lips crops (dubber.cache.derive_crops) in grey
        crops = np.stack([warp_crop(clip["crops"]["box128"][t], compose_affine(lips[t], inverse_affine(box[t])),
                                    MOUTH_CROP.size) for t in ts])
        return grey_mouths(crops)[:, 0]

    expected, elsewhere = derived(word_frames(first, end)), derived(np.full(WORD_FRAMES, 0))
    for sample in real[:, :, 0].numpy():
        assert np.abs(sample - expected).mean() < 0.01 < np.abs(sample - elsewhere).mean()


def test_the_lip_critic_needs_words(clips, tmp_path):
    """Refused without words, and without a run long enough to keep the identity face off the word."""
    short = {**clips[0], "mels": clips[0]["mels"][:24]}
    for corpus in (clips[2:], [short, clips[2]]):
        with pytest.raises(DubberError, match="word alignments"):
            train(recipe_for("cran", batch_size=2, adv_start=0), corpus, tmp_path / "c.pt", 1, log=lambda m: None)


@pytest.mark.parametrize("kind", ["video", "photo"])
def test_lipsync_end_to_end(trained, face_video, face_still, speech_1s, tmp_path, kind):
    weights, _ = trained
    out = tmp_path / "out.mp4"
    code, _, stderr = helpers.run_cli_subprocess(
        ["lipsync", face_video if kind == "video" else face_still, speech_1s, "-o", out, "--backbone", "cran",
         "--weights", weights, "--quiet"])
    assert code == 0, stderr
    assert len(helpers.decode_frames(out)) == 25


def test_a_resume_with_other_settings_names_them(clips, tmp_path):
    train(recipe_for("cran", batch_size=2), clips, tmp_path / "c.pt", 1, log=lambda m: None)
    with pytest.raises(DubberError, match=r"other settings \(lambda_video, lr\)"):
        train(recipe_for("cran", batch_size=2, lr=1e-3, lambda_video=0.0), clips, tmp_path / "c.pt", 2,
              log=lambda m: None)
