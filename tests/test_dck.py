"""DCK backbone and its recipe: shapes, blending, audio wiring, training through the one loop,
checkpoints, shipped size."""

import numpy as np
import pytest
import torch

from dubber.backbones import CROP_BOX, CropSpec, load_backbone
from dubber.backbones.dck import DCK, mouth_region, with_mouth_of
from dubber.checkpoint import save_model
from dubber.errors import DubberError
from dubber.face.align import inverse_affine
from dubber.train.loop import train
from dubber.train.recipes import recipe_for
from dubber.train.recipes.dck import MIN_CLIP_FRAMES, MIN_FRAME_GAP, expert_mouths, sync_loss
from dubber.train.sampler import IdentitySampler

torch.set_num_threads(1)

MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def synthetic_clip(identity: str, frames: int, size: int, seed: int) -> dict:
    """A flat-shaded face whose dark mouth opens with the energy of the low mel bands, in the
    layout of dubber.data.load_clips (box crops, and the transforms the sync loss composes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    skin, background = rng.uniform(80, 220, 3), rng.uniform(0, 255, 3)
    face = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.48) ** 2 < 1
    openness = rng.uniform(0, 1, frames)
    faces = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        image = np.where(face[..., None], skin, background)
        image[(np.abs(xx - 0.5) < 0.15) & (np.abs(yy - 0.72) < 0.02 + 0.1 * openness[t])] = 20
        faces[t] = image.astype(np.uint8)
    mels = np.full((frames, 80, 16), -4.0, np.float32)
    mels[:, :40] += 8 * openness[:, None, None].astype(np.float32)
    scale = size / 96  # the aligned face is the whole crop, scaled (pixel centres kept)
    crop_from_face96 = np.array([[scale, 0, scale / 2 - 0.5], [0, scale, scale / 2 - 0.5]], np.float32)
    box = CropSpec(CROP_BOX, size).key
    return {"crops": {box: faces}, "mels": mels, "identity": identity, "name": f"{identity}-{seed}",
            "speech": np.ones(frames, bool), "landmarks": np.zeros((frames, 68, 2), np.float32),
            "transforms": {box: np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1)),  # frame = box crop
                           "face96": np.tile(inverse_affine(crop_from_face96), (frames, 1, 1))}}


def random_inputs(batch: int, size: int, seed: int = 0, frames: int = 1):
    """faces [B, T, 3, S, S], mels [B, T, 1, 80, 16], identity [B, 3, S, S]."""
    generator = torch.Generator().manual_seed(seed)
    faces = torch.rand(batch, frames, 3, size, size, generator=generator)
    references = torch.rand(batch, 3, size, size, generator=generator)
    mels = torch.rand(batch, frames, 1, 80, 16, generator=generator) * 8 - 4
    return faces, mels, references


def calibrate_batchnorm(model: DCK, size: int) -> DCK:
    """Give BatchNorm real statistics (fresh ones are 0/1, under which an untrained deep net
    fades every signal to ~1e-7), as training would; returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives the exact batch statistics
    with torch.no_grad():
        model.train()(*random_inputs(4, size, seed=1))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DCK:
    torch.manual_seed(0)
    return calibrate_batchnorm(DCK(), 128)


def test_declares_what_the_pipeline_needs(model):
    assert (DCK.name, DCK.mel_width, DCK.window, DCK.stateful, DCK.conditioning, DCK.returns_alpha) == (
        "dck", 16, 1, False, "closed_mouth", True)
    assert model.crop == CropSpec(CROP_BOX, 128)
    small = DCK(size=64)
    assert small.crop == CropSpec(CROP_BOX, 64) and small.init_kwargs["size"] == 64
    assert set(small.init_kwargs) == {"size", "encoder_widths", "n_dynamic", "kernel_hidden", "residual_depths"}
    assert DCK.crop.size == 128  # an instance's size does not leak into the class
    with pytest.raises(ValueError):
        DCK(size=100)  # not divisible by 2**5
    print(f"\nDCK parameters: {sum(p.numel() for p in model.parameters()):,}")


def test_output_shapes_and_ranges(model):
    faces, mels, references = random_inputs(2, 128)
    with torch.no_grad():
        out = model(faces, mels, references)
    assert out.images.shape == (2, 1, 3, 128, 128) and out.alpha.shape == (2, 1, 1, 128, 128)
    assert out.state is None
    for tensor in out[:2]:
        assert torch.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 1
    with pytest.raises(ValueError):
        model(faces, mels, None)


def test_alpha_zero_returns_the_blend_base_exactly():
    """α = 0: the frame itself outside the mouth region, the mouth donor's (default the reference's) inside."""
    torch.manual_seed(0)
    model = DCK(size=64).eval()
    with torch.no_grad():
        model.head.weight[0] = 0
        model.head.bias[0] = -1e4  # sigmoid -> exactly 0
        faces, mels, references = random_inputs(2, 64)
        donors = torch.rand_like(faces)
        out = model(faces, mels, references)
        donated = model(faces, mels, references, mouth_donors=donors)
    assert torch.count_nonzero(out.alpha) == 0
    frames, references = faces[:, 0], references
    assert torch.equal(out.images[:, 0], with_mouth_of(frames, references))
    assert torch.equal(donated.images[:, 0], with_mouth_of(frames, donors[:, 0]))
    region = mouth_region(64)[0, 0]
    outside, inside = region == 0, region == 1
    assert outside[:32].all() and inside[51].any()  # the upper half is never touched; the mouth row is
    assert torch.equal(out.images[:, 0][..., outside], frames[..., outside])
    assert torch.equal(out.images[:, 0][..., inside], references[..., inside])


def test_network_cannot_see_the_mouth_it_replaces(model):
    """The lower half of the face is masked before the network: only blending uses it."""
    faces, mels, references = random_inputs(2, 128)
    faces, mels = faces[:, 0], mels[:, 0]
    other_mouths = faces.clone()
    other_mouths[:, :, 64:] = torch.rand_like(other_mouths[:, :, 64:])
    with torch.no_grad():
        alpha, motion = model.alpha_motion(faces, mels, references)
        alpha_other, motion_other = model.alpha_motion(other_mouths, mels, references)
    assert torch.equal(alpha, alpha_other) and torch.equal(motion, motion_other)


def test_frames_of_a_window_are_independent(model):
    """Window 1: a [B, T] call gives what T separate calls give (the runner may batch frames)."""
    faces, mels, references = random_inputs(1, 128, seed=4, frames=3)
    with torch.no_grad():
        together = model(faces, mels, references).images
        apart = torch.cat([model(faces[:, t:t + 1], mels[:, t:t + 1], references).images for t in range(3)], dim=1)
    torch.testing.assert_close(together, apart)


def test_different_audio_changes_the_output(model):
    faces, mels, references = random_inputs(2, 128)
    same_face = faces[:1].expand(2, -1, -1, -1, -1)
    same_reference = references[:1].expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(same_face, mels, same_reference)
    assert (out.images[0] - out.images[1]).abs().max() > 1e-3
    assert (out.alpha[0] - out.alpha[1]).abs().max() > 1e-4


def test_fp16_checkpoint_round_trip_and_size(tmp_path):
    torch.manual_seed(0)
    model = calibrate_batchnorm(DCK(), 128)  # non-trivial statistics, so they are part of the round trip
    path = tmp_path / "dck.pt"
    save_model(model, path, meta={"note": "test"}, half=True)

    size = path.stat().st_size
    print(f"\nDCK fp16 checkpoint: {size / 1e6:.2f} MB")
    assert size <= MAX_SHIPPED_BYTES
    package = torch.load(path, map_location="cpu", weights_only=True)
    assert package["name"] == "dck" and package["kwargs"] == model.init_kwargs

    loaded = load_backbone("dck", weights=path)
    assert isinstance(loaded, DCK) and not loaded.training and loaded.meta["note"] == "test"
    inputs = random_inputs(2, 128, seed=2)
    with torch.no_grad():
        expected, got = model(*inputs), loaded(*inputs)
    torch.testing.assert_close(got.images, expected.images, atol=1e-2, rtol=0)
    torch.testing.assert_close(got.alpha, expected.alpha, atol=1e-2, rtol=0)


def test_recipe_draws_identities_uniformly_and_distant_frames():
    recipe = recipe_for("dck", size=32, batch_size=400)
    # Identity "big" has 9 clips, "small" one: frames still come half from each.
    clips = [synthetic_clip("big", 12, 32, seed) for seed in range(9)] + [synthetic_clip("small", 12, 32, 9)]
    for clip_index, clip in enumerate(clips):  # stamp clip and frame number into a corner pixel
        clip["crops"]["box32"][:, -1, -1, 0] = clip_index
        clip["crops"]["box32"][:, -1, -1, 1] = np.arange(12)
    sampler = IdentitySampler(clips, recipe.anchors, recipe.identity_power)
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(400)]
    assert 0.4 < np.mean([index == 9 for index, _ in draws]) < 0.6
    images, _, _ = recipe.draw(sampler, np.random.default_rng(0))
    clip_of, frame_of = images[:, :, -1, -1, 0].astype(int), images[:, :, -1, -1, 1].astype(int)  # [N, 3 kinds]
    # Identity frame and mouth donor: same clip, a frame at least MIN_FRAME_GAP away (another mouth).
    assert np.all(clip_of == clip_of[:, :1])
    assert np.all(np.abs(frame_of[:, 1:] - frame_of[:, :1]) >= MIN_FRAME_GAP)
    batch = recipe.batch(sampler, np.random.default_rng(0), torch.device("cpu"))
    assert batch["targets"].shape == (400, 3, 32, 32) and batch["mels"].shape == (400, 1, 80, 16)
    # Clips too short to hold a distant reference are left out, not trained to copy.
    short = synthetic_clip("short", MIN_CLIP_FRAMES - 1, 32, 10)
    assert IdentitySampler(clips + [short], recipe.anchors, 0.0).skipped == 1
    with pytest.raises(DubberError):
        IdentitySampler([short], recipe.anchors, 0.0)


def test_training_learns_resumes_and_ships(tmp_path):
    clips = [synthetic_clip("a", 30, 64, 0), synthetic_clip("b", 30, 64, 1)]
    out = tmp_path / "dck.pt"
    messages = []
    recipe = recipe_for("dck", batch_size=4, size=64, adv_start=14)
    kwargs = dict(log_every=1, checkpoint_every=10, log=messages.append)

    history = train(recipe, clips, out, steps=20, **kwargs)
    l1 = [entry["l1"] for entry in history]
    assert np.mean(l1[-4:]) < 0.8 * np.mean(l1[:4])  # 0.65 on the reference machine
    assert "g_adv" in history[-1] and "d" in history[-1] and "g_adv" not in history[0]
    checkpoint = tmp_path / "dck.train.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 20

    train(recipe, clips, out, steps=22, data_meta={"source": "two synthetic faces"}, **kwargs)
    assert any("resumed" in message and "step 20" in message for message in messages)
    saved = torch.load(checkpoint, weights_only=True)
    assert [entry["step"] for entry in saved["history"]][-2:] == [21, 22]

    package = torch.load(out, map_location="cpu", weights_only=True)
    meta = package["meta"]
    assert meta["steps"] == 22 and meta["recipe"]["size"] == 64 and meta["recipe"]["adv_start"] == 14
    assert meta["data"]["source"] == "two synthetic faces" and meta["data"]["identities"] == 2
    assert meta["hardware"] and meta["state_sha256"]
    assert all(v.dtype == torch.float16 for v in package["state"].values() if v.is_floating_point())

    # The shipped fp16 model behaves like the fp32 training state.
    trained = DCK(size=64)
    trained.load_state_dict(saved["modules"]["model"])
    shipped = load_backbone("dck", weights=out)
    inputs = random_inputs(2, 64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(shipped(*inputs).images, trained.eval()(*inputs).images, atol=1e-2, rtol=0)


class FakeSyncExpert(torch.nn.Module):
    """Differentiable stand-in for the lip-sync expert (P(sync) [N]) that records what it is given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.seen = []

    def forward(self, mouth_windows, mels):
        self.seen.append((tuple(mouth_windows.shape), tuple(mels.shape), mouth_windows.requires_grad))
        face = self.scale * mouth_windows.mean(dim=(2, 3))  # [N, 15]
        return torch.sigmoid(face.mean(dim=1) - mels.mean(dim=(1, 2, 3)) / 8)


def test_sync_expert_loss_in_training(tmp_path):
    expert = FakeSyncExpert().requires_grad_(False)
    clip = synthetic_clip("a", 12, 32, 0)
    recipe = recipe_for("dck", batch_size=10, size=32, adv_start=0, sync_expert="(injected)")
    recipe._loaded_expert = expert
    history = train(recipe, [clip], tmp_path / "dck.pt", steps=2, log_every=1, log=lambda message: None)
    # Two windows of 5 frames, lower halves at the expert's 48x96, still attached to the generator.
    assert expert.seen[0] == ((2, 15, 48, 96), (2, 1, 80, 16), True)
    assert all(np.isfinite(entry["sync"]) and entry["sync"] > 0 for entry in history)
    assert expert.scale.item() == 1.0  # frozen


def test_sync_windows_stack_frames_in_order():
    """The expert gets frame 0 RGB, frame 1 RGB, ... of each window, and the middle frame's mel."""
    generated = torch.rand(10, 3, 64, 64)
    mels = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 80, 16)
    crop_from_face96 = torch.tensor([[0.6, 0.1, 2.0], [-0.1, 0.6, 3.0]]).expand(10, 2, 3)
    expert = FakeSyncExpert()
    captured = {}
    expert.register_forward_hook(lambda module, args, out: captured.update(windows=args[0], mels=args[1]))
    sync_loss(expert, generated, mels, crop_from_face96)
    mouths = expert_mouths(generated, crop_from_face96)
    torch.testing.assert_close(captured["windows"][1, 6:9], mouths[7])  # window 1, frame 2 = row 7
    assert captured["mels"][:, 0, 0, 0].tolist() == [2.0, 7.0]


def test_expert_mouths_follow_the_affine():
    """Bilinear sampling of a linear ramp is exact: mouth pixel (row i, column j) of the aligned face
    shows the crop at crop_from_face96 @ (j, 48 + i, 1)."""
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    images = torch.stack([xs, ys, xs + ys])[None]  # [1, 3, 128, 128]
    affine = torch.tensor([[[0.9, 0.2, 10.0], [-0.15, 0.8, 20.0]]])  # rotation, scale, shift, inside the crop
    mouths = expert_mouths(images, affine)
    assert mouths.shape == (1, 3, 48, 96)
    for i, j in ((0, 0), (10, 50), (47, 95)):
        x, y = (affine[0] @ torch.tensor([j, 48.0 + i, 1.0])).tolist()
        assert mouths[0, 0, i, j].item() == pytest.approx(x, abs=1e-3)
        assert mouths[0, 1, i, j].item() == pytest.approx(y, abs=1e-3)


@pytest.mark.parametrize("name, kwargs", [("dck", {"size": 32}), ("syncnet", {"base_channels": 8})])
def test_init_starts_from_a_model_file_built_alike(tmp_path, name, kwargs):
    trained = recipe_for(name, **kwargs).build()["model"]
    with torch.no_grad():
        for value in trained.parameters():
            value.uniform_()
    save_model(trained, tmp_path / "start.pt")
    started = recipe_for(name, init=str(tmp_path / "start.pt"), **kwargs).build()["model"]
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), trained.state_dict().values()))
    other = {k: v * 2 for k, v in kwargs.items()}
    with pytest.raises(DubberError, match="built with"):
        recipe_for(name, init=str(tmp_path / "start.pt"), **other).build()


def test_a_time_budget_stops_training_and_a_rerun_goes_on(tmp_path):
    clips = [synthetic_clip("a", 12, 32, 0)]
    recipe = recipe_for("dck", batch_size=4, size=32)
    kwargs = dict(log_every=100, log=lambda message: None)
    messages = []
    train(recipe, clips, tmp_path / "dck.pt", steps=1000, max_seconds=0.0, log_every=100, log=messages.append)
    assert torch.load(tmp_path / "dck.train.pt", weights_only=True)["step"] == 1  # stopped after one step
    assert any("time budget of 0m00s reached at step 1" in m for m in messages)
    assert any("first step took" in m and "the time budget stops it after 0m00s" in m for m in messages)
    assert load_backbone("dck", tmp_path / "dck.pt").meta["steps"] == 1
    train(recipe, clips, tmp_path / "dck.pt", steps=3, **kwargs)
    assert torch.load(tmp_path / "dck.train.pt", weights_only=True)["step"] == 3


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """Optimiser state, discriminator and the per-step sampling stream all survive a restart."""
    clips = [synthetic_clip("a", 12, 32, 0)]
    recipe = recipe_for("dck", batch_size=4, size=32, adv_start=3)
    kwargs = dict(log_every=100, log=lambda message: None)
    train(recipe, clips, tmp_path / "straight" / "dck.pt", steps=6, **kwargs)
    train(recipe, clips, tmp_path / "restarted" / "dck.pt", steps=4, **kwargs)
    train(recipe, clips, tmp_path / "restarted" / "dck.pt", steps=6, **kwargs)
    straight, restarted = (torch.load(tmp_path / run / "dck.train.pt", weights_only=True)
                           for run in ("straight", "restarted"))
    for part in ("model", "disc"):
        for key, value in straight["modules"][part].items():
            assert torch.equal(value, restarted["modules"][part][key]), f"{part}.{key}"
