"""DCK backbone: shapes, blending, audio wiring, training, checkpoints, shipped size."""

import numpy as np
import pytest
import torch

from dubber.backbones import CROP_BOX, CropSpec, load_backbone
from dubber.backbones.dck import DCK, mouth_region, with_mouth_of
from dubber.checkpoint import save_model
from dubber.errors import DubberError
from dubber.train.dck import MIN_CLIP_FRAMES, MIN_FRAME_GAP, ClipSampler, _expert_mouths, _sync_loss, train_dck

torch.set_num_threads(1)

MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def synthetic_clip(identity: str, frames: int, size: int, seed: int) -> dict:
    """A flat-shaded face whose dark mouth opens with the energy of the low mel bands."""
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
    crop_from_face96 = np.tile(np.array([[scale, 0, scale / 2 - 0.5], [0, scale, scale / 2 - 0.5]], np.float32), (frames, 1, 1))
    return {"faces": faces, "mels": mels, "identity": identity, "name": f"{identity}-{seed}",
            "crop_from_face96": crop_from_face96}


def random_inputs(batch: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    faces = torch.rand(batch, 3, size, size, generator=generator)
    references = torch.rand(batch, 3, size, size, generator=generator)
    mels = torch.rand(batch, 1, 80, 16, generator=generator) * 8 - 4
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
    assert (DCK.name, DCK.mel_width, DCK.needs_reference, DCK.returns_alpha) == ("dck", 16, True, True)
    assert model.crop == CropSpec(CROP_BOX, 128)
    small = DCK(size=64)
    assert small.crop == CropSpec(CROP_BOX, 64) and small.init_kwargs == {"size": 64}
    assert DCK.crop.size == 128  # an instance's size does not leak into the class
    with pytest.raises(ValueError):
        DCK(size=100)  # not divisible by 2**5
    print(f"\nDCK parameters: {sum(p.numel() for p in model.parameters()):,}")


def test_output_shapes_and_ranges(model):
    faces, mels, references = random_inputs(2, 128)
    with torch.no_grad():
        out = model(faces, mels, references)
    assert out.images.shape == (2, 3, 128, 128) and out.alpha.shape == (2, 1, 128, 128)
    for tensor in out:
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
    assert torch.equal(out.images, with_mouth_of(faces, references))
    assert torch.equal(donated.images, with_mouth_of(faces, donors))
    region = mouth_region(64)[0, 0]
    outside, inside = region == 0, region == 1
    assert outside[:32].all() and inside[51].any()  # the upper half is never touched; the mouth row is
    assert torch.equal(out.images[..., outside], faces[..., outside])
    assert torch.equal(out.images[..., inside], references[..., inside])


def test_network_cannot_see_the_mouth_it_replaces(model):
    """The lower half of the face is masked before the network: only blending uses it."""
    faces, mels, references = random_inputs(2, 128)
    other_mouths = faces.clone()
    other_mouths[:, :, 64:] = torch.rand_like(other_mouths[:, :, 64:])
    with torch.no_grad():
        alpha, motion = model.alpha_motion(faces, mels, references)
        alpha_other, motion_other = model.alpha_motion(other_mouths, mels, references)
    assert torch.equal(alpha, alpha_other) and torch.equal(motion, motion_other)


def test_different_audio_changes_the_output(model):
    faces, mels, references = random_inputs(2, 128)
    same_face = faces[:1].expand(2, -1, -1, -1)
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
    assert package["class"] == "DCK" and package["kwargs"] == {"size": 128}

    loaded = load_backbone("dck", weights=path)
    assert isinstance(loaded, DCK) and not loaded.training and loaded.meta == {"note": "test"}
    inputs = random_inputs(2, 128, seed=2)
    with torch.no_grad():
        expected, got = model(*inputs), loaded(*inputs)
    torch.testing.assert_close(got.images, expected.images, atol=1e-2, rtol=0)
    torch.testing.assert_close(got.alpha, expected.alpha, atol=1e-2, rtol=0)


def test_sampler_picks_identities_uniformly_and_distant_frames():
    # Identity "big" has 9 clips, "small" one: frames still come half from each.
    clips = [synthetic_clip("big", 12, 32, seed) for seed in range(9)] + [synthetic_clip("small", 12, 32, 9)]
    for clip_index, clip in enumerate(clips):  # stamp clip and frame number into a corner pixel
        clip["faces"][:, -1, -1, 0] = clip_index
        clip["faces"][:, -1, -1, 1] = np.arange(12)
    batch = ClipSampler(clips, 32).batch(400, np.random.default_rng(0))
    clip_of = {key: batch[key][:, -1, -1, 0].astype(int) for key in ("targets", "references", "donors")}
    frame_of = {key: batch[key][:, -1, -1, 1].astype(int) for key in ("targets", "references", "donors")}
    assert 0.4 < np.mean(clip_of["targets"] == 9) < 0.6
    # References and mouth donors: same clip, a frame at least MIN_FRAME_GAP away (another mouth).
    for key in ("references", "donors"):
        assert np.array_equal(clip_of[key], clip_of["targets"])
        assert np.all(np.abs(frame_of[key] - frame_of["targets"]) >= MIN_FRAME_GAP)
    # Clips too short to hold a distant reference are left out, not trained to copy.
    short = synthetic_clip("short", MIN_CLIP_FRAMES - 1, 32, 10)
    assert ClipSampler(clips + [short], 32).describe()["skipped_short_clips"] == 1
    with pytest.raises(DubberError):
        ClipSampler([short], 32)
    # Windows for the sync expert: runs of 5 consecutive frames of one clip.
    windows = ClipSampler(clips, 32, window=5).batch(12, np.random.default_rng(0))
    frames = windows["targets"][:, -1, -1, 1].astype(int).reshape(2, 5)
    assert windows["targets"].shape == (10, 32, 32, 3) and np.all(np.diff(frames, axis=1) == 1)


def test_training_learns_resumes_and_ships(tmp_path):
    clips = [synthetic_clip("a", 30, 64, 0), synthetic_clip("b", 30, 64, 1)]
    out = tmp_path / "dck.pt"
    messages = []
    kwargs = dict(batch_size=4, size=64, adv_start=14, log_every=1, checkpoint_every=10, log=messages.append)

    history = train_dck(clips, out, steps=20, **kwargs)
    l1 = [entry["l1"] for entry in history]
    assert np.mean(l1[-4:]) < 0.8 * np.mean(l1[:4])  # 0.65 on the reference machine
    assert "g_adv" in history[-1] and "d" in history[-1] and "g_adv" not in history[0]
    checkpoint = tmp_path / "dck.train.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 20

    resumed = train_dck(clips, out, steps=22, data_meta={"data": "two synthetic faces"}, **kwargs)
    assert any("resumed" in message and "step 20" in message for message in messages)
    assert [entry["step"] for entry in resumed] == [21, 22]

    package = torch.load(out, map_location="cpu", weights_only=True)
    assert package["meta"]["steps"] == 22 and package["meta"]["resolution"] == 64
    assert package["meta"]["data"] == "two synthetic faces" and package["meta"]["data_stats"]["identities"] == 2
    assert all(v.dtype == torch.float16 for v in package["state"].values() if v.is_floating_point())

    # The shipped fp16 model behaves like the fp32 training state.
    trained = DCK(size=64)
    trained.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    shipped = load_backbone("dck", weights=out)
    inputs = random_inputs(2, 64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(shipped(*inputs).images, trained.eval()(*inputs).images, atol=1e-2, rtol=0)


class FakeSyncExpert(torch.nn.Module):
    """Differentiable stand-in for the lip-sync expert that records what it is given.

    Returns P(sync) [N], or with `embeddings` a (face, audio) embedding pair as SyncNet does."""

    def __init__(self, embeddings: bool):
        super().__init__()
        self.embeddings = embeddings
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.seen = []

    def forward(self, mouth_windows, mels):
        self.seen.append((tuple(mouth_windows.shape), tuple(mels.shape), mouth_windows.requires_grad))
        face = self.scale * mouth_windows.mean(dim=(2, 3))  # [N, 15]
        if self.embeddings:
            return torch.relu(face), torch.relu(mels.mean(dim=(1, 3))[:, :15] + 4)
        return torch.sigmoid(face.mean(dim=1) - mels.mean(dim=(1, 2, 3)) / 8)


@pytest.mark.parametrize("embeddings", [False, True])
def test_sync_expert_hook(tmp_path, embeddings):
    expert = FakeSyncExpert(embeddings)
    history = train_dck([synthetic_clip("a", 12, 32, 0)], tmp_path / "dck.pt", steps=2, batch_size=10, size=32,
                        adv_start=0, log_every=1, log=lambda message: None, sync_expert=expert)
    # Two windows of 5 frames, lower halves at the expert's 48x96, still attached to the generator.
    assert expert.seen[0] == ((2, 15, 48, 96), (2, 1, 80, 16), True)
    assert all(np.isfinite(entry["sync"]) and entry["sync"] > 0 for entry in history)
    assert expert.scale.item() == 1.0 and not expert.scale.requires_grad  # frozen


def test_sync_windows_stack_frames_in_order():
    """The expert gets frame 0 RGB, frame 1 RGB, ... of each window, and the middle frame's mel."""
    generated = torch.rand(10, 3, 64, 64)
    mels = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 80, 16)
    crop_from_face96 = torch.tensor([[0.6, 0.1, 2.0], [-0.1, 0.6, 3.0]]).expand(10, 2, 3)
    expert = FakeSyncExpert(embeddings=False)
    captured = {}
    expert.register_forward_hook(lambda module, args, out: captured.update(windows=args[0], mels=args[1]))
    _sync_loss(expert, generated, mels, crop_from_face96)
    mouths = _expert_mouths(generated, crop_from_face96)
    torch.testing.assert_close(captured["windows"][1, 6:9], mouths[7])  # window 1, frame 2 = row 7
    assert captured["mels"][:, 0, 0, 0].tolist() == [2.0, 7.0]


def test_expert_mouths_follow_the_affine():
    """Bilinear sampling of a linear ramp is exact: mouth pixel (row i, column j) of the aligned face
    shows the crop at crop_from_face96 @ (j, 48 + i, 1)."""
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    images = torch.stack([xs, ys, xs + ys])[None]  # [1, 3, 128, 128]
    affine = torch.tensor([[[0.9, 0.2, 10.0], [-0.15, 0.8, 20.0]]])  # rotation, scale, shift, inside the crop
    mouths = _expert_mouths(images, affine)
    assert mouths.shape == (1, 3, 48, 96)
    for i, j in ((0, 0), (10, 50), (47, 95)):
        x, y = (affine[0] @ torch.tensor([j, 48.0 + i, 1.0])).tolist()
        assert mouths[0, 0, i, j].item() == pytest.approx(x, abs=1e-3)
        assert mouths[0, 1, i, j].item() == pytest.approx(y, abs=1e-3)


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """Optimiser state, discriminator and the per-step sampling stream all survive a restart."""
    clips = [synthetic_clip("a", 12, 32, 0)]
    kwargs = dict(batch_size=4, size=32, adv_start=3, log_every=100, log=lambda message: None)
    train_dck(clips, tmp_path / "straight" / "dck.pt", steps=6, **kwargs)
    train_dck(clips, tmp_path / "restarted" / "dck.pt", steps=4, **kwargs)
    train_dck(clips, tmp_path / "restarted" / "dck.pt", steps=6, **kwargs)
    straight, restarted = (torch.load(tmp_path / run / "dck.train.pt", weights_only=True)
                           for run in ("straight", "restarted"))
    for part in ("model", "disc"):
        for key, value in straight[part].items():
            assert torch.equal(value, restarted[part][key]), f"{part}.{key}"
