"""Glance backbone (dubber.backbones.glance) and its recipe: shapes, the 16/8 window through the
runner, the differentiable flow, lips crops derived from a cache's stored crops, training through
the one loop (the loss goes down, checkpoints round-trip and resume), the ablation switches, and
`dubber lipsync --backbone glance` end to end with a tiny trained file (no shipped weights needed)."""

import numpy as np
import pytest
import torch

import helpers
from dubber.apply import Generator, Step, apply_backbone, crossfade_weights
from dubber.backbones import CROP_LIPS, CropSpec, load_backbone
from dubber.backbones.glance import OVERLAP, SIZE, WINDOW, Glance, fuse
from dubber.cache import derive_crops, derive_source, is_current
from dubber.checkpoint import save_model
from dubber.face.align import crop_transforms, warp_crop
from dubber.face.landmarks import LEFT_EYE, NOSE_TIP, RIGHT_EYE
from dubber.train.discriminators import ThreeStreamDiscriminator
from dubber.train.flow import clip_flow, lucas_kanade
from dubber.train.loop import train
from dubber.train.recipes import recipe_for
from dubber.train.recipes.glance import CorrelationNets

torch.set_num_threads(1)
LIPS = CropSpec(CROP_LIPS, SIZE).key
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def synthetic_clip(identity: str, frames: int, seed: int) -> dict:
    """Lip crops (a dark mouth whose height follows the low mel bands' energy, on a skin tone of its
    own) in the layout of dubber.data.load_clips."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    skin = rng.uniform(90, 220, 3)
    openness = np.clip(np.convolve(rng.uniform(0, 1, frames + 2), np.ones(3) / 3, "valid"), 0, 1)
    lips = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    for t in range(frames):
        image = np.tile(skin, (SIZE, SIZE, 1))
        image[(((xx - 0.5) / 0.25) ** 2 + ((yy - 0.5) / (0.05 + 0.15 * openness[t])) ** 2) < 1] = (40, 10, 20)
        lips[t] = image.astype(np.uint8)
    mels = np.full((frames, 80, 16), -4.0, np.float32)
    mels[:, :40] += 8 * openness[:, None, None].astype(np.float32)
    return {"crops": {LIPS: lips}, "mels": mels, "identity": identity, "name": f"{identity}-{seed}",
            "speech": np.ones(frames, bool), "landmarks": np.zeros((frames, 68, 2), np.float32),
            "transforms": {LIPS: np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1))}}


def calibrated(model: Glance) -> Glance:
    """BatchNorm given the statistics of one batch (fresh 0/1 statistics fade an untrained deep
    net's signal away), in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()(None, torch.rand(2, WINDOW, 1, 80, 16, generator=generator) * 8 - 4,
                      torch.rand(2, 3, SIZE, SIZE, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Glance:
    torch.manual_seed(0)
    return calibrated(Glance())


def test_declares_the_windowed_contract(model):
    assert (Glance.name, Glance.window, Glance.overlap, Glance.conditioning, Glance.returns_alpha) == (
        "glance", 16, 8, "closed_mouth", False)
    assert model.crop == CropSpec(CROP_LIPS, 64)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters * 2 < MAX_SHIPPED_BYTES  # fp16


def test_shapes_and_fusion(model):
    mels = torch.rand(3, WINDOW, 1, 80, 16) * 8 - 4
    identity = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(None, mels, identity)
        audio = model.audio_features(mels)
    assert out.images.shape == (3, WINDOW, 3, SIZE, SIZE) and out.alpha is None and out.state is None
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert audio.shape == (3, 32, WINDOW, 8)
    fused = fuse(audio, torch.rand(3, 128, 8, 8))
    assert fused.shape == (3, 160, WINDOW, 8, 8)
    # duplication: the audio part is constant along height, the image part along time
    assert torch.equal(fused[:, :32, :, 0], fused[:, :32, :, 5]) and torch.equal(fused[:, 32:, 0], fused[:, 32:, 9])
    with pytest.raises(ValueError, match="identity"):
        model(None, mels, None)
    with pytest.raises(ValueError, match="identity must be"):
        model(None, mels, torch.rand(3, 3, 32, 32))


def test_audio_drives_the_frames(model):
    """Different speech gives different lips from the same identity image; the same speech the same."""
    identity = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    silent, loud = torch.full((1, WINDOW, 1, 80, 16), -4.0), torch.full((1, WINDOW, 1, 80, 16), 2.0)
    with torch.no_grad():
        a, b, c = (model(None, m, identity).images for m in (silent, loud, silent))
    assert torch.equal(a, c) and (a - b).abs().mean() > 1e-3


def test_window_and_overlap_through_the_runner(model):
    """40 frames through dubber.apply: windows of 16 every 8 frames, shared frames cross-faded, the
    tail padded with the last frame and trimmed: the same numbers as calling the model directly."""
    frames = 40
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (frames, SIZE, SIZE, 3), np.uint8)
    mels = (rng.random((frames, 80, 16)) * 8 - 4).astype(np.float32)
    identity = rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)
    generator = Generator(model, torch.device("cpu"))
    out = list(apply_backbone(generator, (Step(c, m, t) for t, (c, m) in enumerate(zip(crops, mels))), identity))
    assert [payload for payload, _, _ in out] == list(range(frames))
    got = np.stack([g for _, _, g in out]).astype(np.float32)

    stride = WINDOW - OVERLAP
    fade = crossfade_weights(WINDOW, OVERLAP)
    sums, weights = np.zeros((frames, SIZE, SIZE, 3)), np.zeros(frames)
    for start in range(0, frames - OVERLAP, stride):
        index = np.minimum(np.arange(start, start + WINDOW), frames - 1)
        images, _ = generator(crops[index][None], mels[index][None], identity)
        for k, i in enumerate(range(start, min(start + WINDOW, frames))):
            sums[i] += fade[k] * images[0, k]
            weights[i] += fade[k]
    expected = np.clip(np.round(sums / weights[:, None, None, None]), 0, 255)
    assert np.abs(got - expected).max() <= 1
    # frames 8-15 come from two windows: both matter
    first, _ = generator(crops[None, :16], mels[None, :16], identity)
    assert np.abs(got[12] - first[0, 12]).mean() > 0.01


def test_lucas_kanade_recovers_a_shift_and_passes_gradients():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    pattern = lambda shift: (0.5 + 0.25 * torch.sin((xx - shift) / 3) * torch.cos(yy / 4))[None, None]  # noqa: E731
    flow = lucas_kanade(pattern(0.0), pattern(0.5))
    inner = flow[:, :, 4:-4, 4:-4]
    assert abs(inner[:, 0].median().item() - 0.5) < 0.1 and inner[:, 1].abs().median().item() < 0.05
    clips = torch.rand(2, 4, 3, 64, 64, requires_grad=True)
    out = clip_flow(clips)
    assert out.shape == (2, 2, 3, 32, 32)
    out.abs().sum().backward()
    assert clips.grad.abs().sum() > 0


def test_critics_shapes():
    clips, mels = torch.rand(2, WINDOW, 3, SIZE, SIZE), torch.rand(2, WINDOW, 1, 80, 16)
    flow = clip_flow(clips)
    assert ThreeStreamDiscriminator()(mels, clips, flow).shape == (2,)
    assert ThreeStreamDiscriminator(flow_stream=False)(mels, clips).shape == (2,)
    with pytest.raises(ValueError, match="flow"):
        ThreeStreamDiscriminator()(mels, clips)
    loss = CorrelationNets()(torch.rand(2, 32, WINDOW - 1, 8), flow)
    assert loss.shape == () and 0 <= loss.item() <= 2


def _face_landmarks(frames: int) -> np.ndarray:
    """68 points whose eyes and nose tip (all alignment uses) sit on a face tilted by 8 degrees."""
    points = np.zeros((frames, 68, 2), np.float32)
    angle = np.deg2rad(8)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for index, xy in ((LEFT_EYE, (-30, -10)), (RIGHT_EYE, (30, -10)), ([NOSE_TIP], (0, 25))):
        points[:, index] = rot @ np.array(xy, np.float64) + (160, 120)
    points += np.arange(frames)[:, None, None] * 0.5  # a little motion
    return points


def test_lips_crops_derived_from_a_stored_crop():
    """A cache without lips crops is not rebuilt: they are resampled from its box crops and match
    lips crops cut from the frames themselves."""
    yy, xx = np.mgrid[0:240, 0:320]
    frame = (127 + 60 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 7.0)[..., None] * [1, 0.8, 0.6]).astype(np.uint8)
    landmarks = _face_landmarks(3)
    box = CropSpec("box", 128)
    lips = CropSpec(CROP_LIPS, 64)
    box_transforms = crop_transforms(landmarks, box)
    cache = {"landmarks": landmarks, f"transform_{box.key}": box_transforms,
             f"crops_{box.key}": np.stack([warp_crop(frame, m, 128) for m in box_transforms])}
    assert derive_source(lips, [CropSpec("face", 96), box]) == box
    assert derive_source(lips, [CropSpec("face", 48)]) is None  # would stretch its pixels too far
    assert derive_source(CropSpec("face", 96), [box]) is None  # only lips lie inside every other crop
    transforms, crops = derive_crops(cache, lips, box)
    direct_transforms = crop_transforms(landmarks, lips)
    assert np.allclose(transforms, direct_transforms)
    direct = np.stack([warp_crop(frame, m, 64) for m in direct_transforms])
    assert helpers.psnr(crops[:, 4:-4, 4:-4], direct[:, 4:-4, 4:-4]) > 30


def test_cache_with_a_box_crop_counts_as_current_for_lips(tmp_path):
    path = tmp_path / "clip.npz"
    np.savez(path, version=np.array(2), crops_box128=np.zeros((1, 128, 128, 3), np.uint8))
    assert is_current(path, [CropSpec(CROP_LIPS, 64)]) and is_current(path, [CropSpec("box", 128)])
    assert not is_current(path, [CropSpec("face", 96)])


@pytest.fixture(scope="module")
def clips():
    return [synthetic_clip(f"person{k}", 40, seed=k) for k in range(3)]


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    """A glance file trained for 8 steps of the full recipe on synthetic clips (batch 2), and its history."""
    out = tmp_path_factory.mktemp("glance") / "glance.pt"
    recipe = recipe_for("glance", batch_size=2, ae_steps=4)
    history = train(recipe, clips, out, 8, log_every=4, log=lambda message: None)
    return out, history


def test_training_lowers_the_loss(trained, clips, tmp_path):
    """Every loss of the full recipe is computed; the reconstruction falls by a third in 24 steps
    when it is the only loss (the adversarial and correlation terms make the total jumpy this early)."""
    _, history = trained
    assert {"ae", "pix", "corr", "gen", "dis"} <= set(history[0]) and "perc" in history[-1]
    recipe = recipe_for("glance", batch_size=2, lr=1e-3, lambda_gen=0.0, corr_weight=0.0, lambda_perc=0.0, ae_steps=0)
    losses = train(recipe, clips, tmp_path / "g.pt", 24, log_every=6, log=lambda message: None)
    assert losses[-1]["pix"] < 0.75 * losses[0]["pix"], losses


def test_checkpoint_round_trip(trained, tmp_path):
    path, _ = trained
    assert path.stat().st_size < MAX_SHIPPED_BYTES
    model = load_backbone("glance", path)
    assert model.meta["steps"] == 8 and model.meta["recipe"]["corr_weight"] == 1.0
    mels, identity = torch.rand(1, WINDOW, 1, 80, 16) * 8 - 4, torch.rand(1, 3, SIZE, SIZE)
    again = tmp_path / "again.pt"
    save_model(model, again)
    with torch.no_grad():
        assert torch.equal(model(None, mels, identity).images, load_backbone("glance", again)(None, mels, identity).images)


def test_resume_is_exact(clips, tmp_path):
    """3 steps in one go == 2 steps, then resumed to 3 (the loop's per-step RNG and saved state)."""
    helpers.assert_resume_is_exact(recipe_for("glance", batch_size=2, ae_steps=1), clips, tmp_path)


@pytest.mark.parametrize("switch, absent", [({"corr_weight": 0.0}, "corr"), ({"flow_stream": False}, None)])
def test_ablation_switches(clips, tmp_path, switch, absent):
    recipe = recipe_for("glance", batch_size=2, ae_steps=0, **switch)
    modules = recipe.build()
    assert (modules["disc"].flow is None) == (not recipe.flow_stream)
    history = train(recipe, clips, tmp_path / "g.pt", 1, log_every=1, log=lambda message: None)
    assert "gen" in history[0] and (absent is None or absent not in history[0])


@pytest.mark.parametrize("kind", ["video", "photo"])
def test_lipsync_end_to_end(trained, face_video, face_still, speech_1s, tmp_path, kind):
    """`dubber lipsync --backbone glance` with the tiny file: a video of the audio's length whose
    frames differ from the input only round the mouth (the lips pasted through the blend)."""
    weights, _ = trained
    face = face_video if kind == "video" else face_still
    out = tmp_path / "out.mp4"
    code, stdout, stderr = helpers.run_cli_subprocess(
        ["lipsync", face, speech_1s, "-o", out, "--backbone", "glance", "--weights", weights, "--quiet"])
    assert code == 0, stderr
    frames = helpers.decode_frames(out)
    assert len(frames) == 25
    source = helpers.decode_frames(face) if kind == "video" else [helpers.face_frame(0.0, motion=False)] * 25
    changed = np.abs(frames[12].astype(np.float32) - source[12][:frames[12].shape[0]].astype(np.float32)).max(-1)
    rows, cols = np.nonzero(changed > 25)
    assert rows.size, "the mouth was not replaced"
    height = frames[12].shape[0]
    assert rows.min() > height * 0.3, "changes above the mouth: the paste leaked"
