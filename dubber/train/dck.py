"""Train the DCK backbone (dubber.backbones.dck) from talking-face clips, self-supervised.

The paper trains on pairs of videos that differ only in the lips, made with Wav2Lip; we have no
such pairs, so every training sample is built from one real clip instead. For a target frame t:

  reference  a random frame of the same clip, at least MIN_FRAME_GAP frames from t: identity
             and texture (teeth, lips), never the answer;
  blend base I: frame t with the mouth-and-chin ellipse (backbones.dck.mouth_region) of another
             distant frame, the mouth donor, so the mouth in I is wrong and copying it is penalised,
             while cheeks and nose stay exact (at inference the donor is the reference: see
             pipeline.reference_frame);
  input      I with its lower half zeroed, plus the reference (DCK.forward masks I itself);
  audio      the mel window of frame t;
  target     frame t.

Loss: LAMBDA_REC * L1 (lower half weighted by MOUTH_WEIGHT: the mouth is a small part of the crop
but all of the task) + ADV_WEIGHT * LSGAN after ADV_START reconstruction-only steps, plus, when a
lip-sync expert is given, SYNC_WEIGHT * its -log P(in sync) from the same step.

Batches are drawn by identity (identity uniformly, then a clip, then a frame) because one speaker
can be 90 % of the frames. Augmentation: horizontal flip and a small colour jitter, the same for
the target, reference and blend base of a sample so the target stays reachable.
"""

import datetime
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from dubber.backbones.dck import SIZE, DCK, PatchDiscriminator
from dubber.checkpoint import save_atomic, save_model
from dubber.errors import DubberError
from dubber.eval.syncnet import FACE_SIZE as SYNC_FACE_SIZE, MOUTH_H as SYNC_MOUTH_H
from dubber.train import hardware_description

BATCH_SIZE = 16
LEARNING_RATE = 2e-4
ADAM_BETAS = (0.5, 0.999)  # the usual GAN setting: less momentum than Adam's default 0.9
LAMBDA_REC = 10.0  # paper, Eq. 5
ADV_WEIGHT = 1.0
ADV_START = 2000  # steps; before this the GAN would judge blurry faces and only add noise
MOUTH_WEIGHT = 3.0  # L1 weight of the lower half of the crop relative to the upper half
SYNC_WEIGHT = 0.3  # Wav2Lip's 0.03 : 0.97 sync-to-L1 ratio, times our LAMBDA_REC
SYNC_WINDOW = 5  # consecutive frames the lip-sync expert judges (0.2 s at 25 fps)
MIN_FRAME_GAP = 5  # frames between the target and its reference / mouth donor (different mouths)
# Shorter clips are skipped: a reference or donor next to (or equal to) the target shows the
# answer's mouth, and the model would learn to copy instead of listening.
MIN_CLIP_FRAMES = 2 * MIN_FRAME_GAP
FLIP_PROBABILITY = 0.5
COLOUR_JITTER = 0.08  # brightness shift, contrast and saturation factors within +-8 %
CHECKPOINT_EVERY = 500  # steps
LOG_EVERY = 50  # steps
SEED = 0
CHECKPOINT_FORMAT = "dck-train-1"

Clip = Dict[str, object]  # "faces" uint8 [T, S, S, 3] RGB, "mels" float32 [T, 80, 16], "identity", "name"
# (+ "crop_from_face96" float32 [T, 2, 3] for the sync loss; dubber.train.data.load_clips gives all)


def train_dck(clips: Sequence[Clip], out_path: Union[str, Path], steps: int, batch_size: int = BATCH_SIZE,
              lr: float = LEARNING_RATE, size: int = SIZE, device: str = "cpu", lambda_rec: float = LAMBDA_REC,
              adv_weight: float = ADV_WEIGHT, adv_start: int = ADV_START, log: Callable[[str], None] = print,
              log_every: int = LOG_EVERY, checkpoint_every: int = CHECKPOINT_EVERY, resume: bool = True,
              checkpoint_path: Optional[Union[str, Path]] = None, sync_expert: Optional[torch.nn.Module] = None,
              sync_weight: float = SYNC_WEIGHT, seed: int = SEED,
              data_meta: Optional[Dict[str, object]] = None) -> List[Dict[str, float]]:
    """Train DCK for `steps` optimiser steps in total and write the fp16 model to `out_path`.

    clips: dicts with "faces" uint8 [T, size, size, 3] RGB box crops, "mels" float32 [T, 80, 16]
    (dubber.audio.mel_windows, one window per frame), "identity" str and "name" str. Clips shorter
    than MIN_CLIP_FRAMES are skipped (counted in the shipped meta).
    Training state goes to `checkpoint_path` (default: <out_path stem>.train.pt beside it) every
    `checkpoint_every` steps and at the end; with `resume` an existing one is continued, so calling
    again with a larger `steps` trains further.
    sync_expert (optional, kept frozen): called as expert(mouth_windows [N, 15, 48, 96] in [0, 1],
    mels [N, 1, 80, 16]) where a mouth window is 5 consecutive generated frames warped to the
    expert's view (the lower half of the 96x96 aligned face, through the clips'
    "crop_from_face96") and stacked frame-major (frame 0 RGB, frame 1 RGB, ...), and the mel
    window is the middle frame's; it returns P(in sync) [N], or (face_emb, audio_emb) [N, D] whose
    cosine similarity is taken as P, as dubber.eval.syncnet.SyncNet does. With it, batches are
    made of windows of 5 consecutive frames.
    data_meta: entries for the shipped file's meta, e.g. {"data": "<what corpus, which split>"};
    the clip statistics are recorded under "data_stats" either way.
    Returns the logged history: one dict of mean losses per `log_every` steps.
    """
    out_path = Path(out_path)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else out_path.with_name(out_path.stem + ".train.pt")
    sampler = ClipSampler(clips, size, window=SYNC_WINDOW if sync_expert is not None else 1,
                          with_mouth_geometry=sync_expert is not None)
    if sync_expert is not None and batch_size < SYNC_WINDOW:
        raise DubberError(f"batch size must be at least {SYNC_WINDOW} with a sync expert")
    device = torch.device(device)

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = DCK(size=size).to(device)
        disc = PatchDiscriminator().to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=ADAM_BETAS)
    step = 0
    if resume and checkpoint_path.is_file():
        step = _load_checkpoint(checkpoint_path, model, disc, opt_g, opt_d, device)
        log(f"resumed from {checkpoint_path} at step {step}")
    if sync_expert is not None:
        sync_expert = sync_expert.to(device).eval().requires_grad_(False)

    model.train()
    disc.train()
    mouth_weights = _mouth_weights(size, device)
    history: List[Dict[str, float]] = []
    totals: Dict[str, float] = defaultdict(float)
    counted, tic = 0, time.perf_counter()
    while step < steps:
        rng = np.random.default_rng([seed, step])  # per-step stream: a resumed run draws what it would have
        batch = sampler.batch(batch_size, rng)
        targets, references, donors, mels, flipped = _augment_batch(batch, rng, device, sampler.window)
        adversarial = step >= adv_start

        generated = model(targets, mels, references, mouth_donors=donors).images
        l1 = ((generated - targets).abs() * mouth_weights).mean()
        loss_g = lambda_rec * l1
        losses = {"l1": l1.item()}
        if adversarial:
            g_adv = ((disc(generated) - 1) ** 2).mean()
            loss_g = loss_g + adv_weight * g_adv
            losses["g_adv"] = g_adv.item()
        if sync_expert is not None and adversarial:
            crop_from_face96 = torch.from_numpy(batch["crop_from_face96"]).to(device)
            sync = _sync_loss(sync_expert, torch.where(flipped, generated.flip(-1), generated), mels, crop_from_face96)
            loss_g = loss_g + sync_weight * sync
            losses["sync"] = sync.item()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        if adversarial:
            # LSGAN (paper Eq. 4): real towards 1, generated towards 0.
            loss_d = 0.5 * (((disc(targets) - 1) ** 2).mean() + (disc(generated.detach()) ** 2).mean())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            losses["d"] = loss_d.item()

        step += 1
        losses["total_g"] = loss_g.item()
        for key, value in losses.items():
            totals[key] += value
        counted += 1
        if step % log_every == 0 or step == steps:
            means = {key: value / counted for key, value in totals.items()}
            seconds = (time.perf_counter() - tic) / counted
            history.append({"step": step, "s_per_step": seconds, **means})
            log(f"step {step}/{steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                + f"  {seconds:.2f} s/step")
            totals, counted, tic = defaultdict(float), 0, time.perf_counter()
        if step % checkpoint_every == 0 or step == steps:
            _save_checkpoint(checkpoint_path, model, disc, opt_g, opt_d, step)

    stats = sampler.describe()
    meta = {
        "backbone": "dck",
        "recipe": "self-supervised on real clips (dubber.train.dck)",
        "data": f"{stats['clips']} clips, {stats['identities']} identities, {stats['frames']} frames",
        "data_stats": stats,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "resolution": size,
        "losses": {k: v for k, v in history[-1].items() if k != "step"} if history else {},
        "hardware": hardware_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(data_meta or {}),
    }
    save_model(model.cpu(), out_path, meta=meta, half=True)
    log(f"wrote {out_path}")
    return history


class ClipSampler:
    """Draws training frames by identity: identity uniformly, then a clip, then a frame (or a window
    of `window` consecutive frames)."""

    def __init__(self, clips: Sequence[Clip], size: int, window: int = 1, with_mouth_geometry: bool = False):
        self.window = window
        self.with_mouth_geometry = with_mouth_geometry
        by_identity: Dict[str, List[Clip]] = defaultdict(list)
        for clip in clips:
            faces, mels = clip["faces"], clip["mels"]
            name = clip.get("name", "?")
            if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (size, size, 3):
                raise DubberError(f"clip {name!r}: faces must be uint8 [T, {size}, {size}, 3], "
                                  f"got {faces.dtype} {tuple(faces.shape)}")
            if mels.ndim != 3 or mels.shape[0] != faces.shape[0] or mels.shape[1] != 80:
                raise DubberError(f"clip {name!r}: mels must be [T, 80, W] with T = {faces.shape[0]}, "
                                  f"got {tuple(mels.shape)}")
            if with_mouth_geometry and np.shape(clip.get("crop_from_face96")) != (faces.shape[0], 2, 3):
                raise DubberError(f"clip {name!r}: the sync loss needs 'crop_from_face96' [T, 2, 3]")
            if faces.shape[0] >= max(window, MIN_CLIP_FRAMES):
                by_identity[str(clip["identity"])].append(clip)
        self.skipped = len(clips) - sum(len(group) for group in by_identity.values())
        if not by_identity:
            raise DubberError(f"no training clip with at least {max(window, MIN_CLIP_FRAMES)} frames")
        self.identities = sorted(by_identity)
        self.by_identity = by_identity
        self.clips = [clip for identity in self.identities for clip in by_identity[identity]]

    def describe(self) -> Dict[str, object]:
        return {
            "clips": len(self.clips),
            "identities": len(self.identities),
            "frames": int(sum(clip["faces"].shape[0] for clip in self.clips)),
            "skipped_short_clips": self.skipped,
            "names": [str(clip.get("name", "?")) for clip in self.clips[:100]],
        }

    def batch(self, batch_size: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """-> "targets", "references", "donors" uint8 [B, S, S, 3], "mels" float32 [B, 80, W] (and
        the targets' "crop_from_face96" [B, 2, 3] with with_mouth_geometry);
        with window > 1, B = (batch_size // window) * window and each run of `window` rows is
        consecutive frames of one clip."""
        rows = defaultdict(list)
        for _ in range(batch_size // self.window):
            identity = self.identities[rng.integers(len(self.identities))]
            clips = self.by_identity[identity]
            clip = clips[rng.integers(len(clips))]
            faces, mels = clip["faces"], clip["mels"]
            start = int(rng.integers(faces.shape[0] - self.window + 1))
            for t in range(start, start + self.window):
                rows["targets"].append(faces[t])
                rows["references"].append(faces[_distant_frame(faces.shape[0], t, rng)])
                rows["donors"].append(faces[_distant_frame(faces.shape[0], t, rng)])
                rows["mels"].append(mels[t])
                if self.with_mouth_geometry:
                    rows["crop_from_face96"].append(clip["crop_from_face96"][t])
        return {key: np.stack(value) for key, value in rows.items()}


def _distant_frame(length: int, t: int, rng: np.random.Generator) -> int:
    """A random frame index at least MIN_FRAME_GAP from t (length >= MIN_CLIP_FRAMES guarantees one)."""
    candidates = np.flatnonzero(np.abs(np.arange(length) - t) >= MIN_FRAME_GAP)
    return int(candidates[rng.integers(candidates.size)])


def _augment_batch(batch: Dict[str, np.ndarray], rng: np.random.Generator, device: torch.device, window: int = 1):
    """uint8 batch -> float tensors on device: targets, references, mouth donors [B, 3, S, S] in [0, 1],
    mels [B, 1, 80, W] and flipped bool [B, 1, 1, 1]. Flip and jitter are drawn per run of `window`
    rows (one sample, or one window of consecutive frames) and applied to all three images."""
    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)

    images = torch.stack([to_tensor(batch[key]) for key in ("targets", "references", "donors")])  # [3, B, 3, S, S]
    groups = images.shape[1] // window

    def per_row(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.repeat(values, window)).to(device).view(1, -1, 1, 1, 1)

    flip = per_row(rng.random(groups) < FLIP_PROBABILITY)
    images = torch.where(flip, images.flip(-1), images)

    def factors(centre: float) -> torch.Tensor:
        return per_row(centre + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, groups).astype(np.float32))

    # Pointwise, with a fixed pivot (0.5) instead of the image mean, so the same jitter maps the
    # target and the blend base made from it to the same pixels wherever they agree.
    images = (images - 0.5) * factors(1.0) + 0.5 + factors(0.0)
    grey = images.mean(dim=2, keepdim=True)
    images = ((images - grey) * factors(1.0) + grey).clamp_(0, 1)

    targets, references, donors = images
    mels = torch.from_numpy(batch["mels"]).to(device).float().unsqueeze(1)
    return targets, references, donors, mels, flip[0]


def _mouth_weights(size: int, device: torch.device) -> torch.Tensor:
    """Per-row L1 weights [1, 1, S, 1]: lower half MOUTH_WEIGHT, upper half 1, mean 1."""
    rows = torch.ones(size, device=device)
    rows[size // 2:] = MOUTH_WEIGHT
    return (rows / rows.mean()).view(1, 1, size, 1)


def _expert_mouths(images: torch.Tensor, crop_from_face96: torch.Tensor) -> torch.Tensor:
    """Crops [N, 3, S, S] -> the expert's mouth view [N, 3, 48, 96]: the rows of the 96x96 aligned face
    that dubber.eval.syncnet.mouths_from_faces keeps, resampled (bilinear, differentiable) through
    the pixel affines crop_from_face96 [N, 2, 3]."""
    size = images.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(SYNC_FACE_SIZE - SYNC_MOUTH_H, SYNC_FACE_SIZE, device=images.device, dtype=images.dtype),
                            torch.arange(SYNC_FACE_SIZE, device=images.device, dtype=images.dtype), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [48, 96, 3] face pixel centres
    in_crop = torch.einsum("hwk,nck->nhwc", points, crop_from_face96.to(images.dtype))  # [N, 48, 96, 2]
    grid = (2 * in_crop + 1) / size - 1  # pixel centres -> grid_sample's [-1, 1] (align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _sync_loss(sync_expert: torch.nn.Module, generated: torch.Tensor, mels: torch.Tensor,
               crop_from_face96: torch.Tensor) -> torch.Tensor:
    """-log P(in sync) of windows of SYNC_WINDOW consecutive generated frames [N, 3, S, S] (unflipped),
    seen as the expert sees real video (_expert_mouths), averaged."""
    windows = generated.shape[0] // SYNC_WINDOW
    mouths = _expert_mouths(generated, crop_from_face96)
    mouth_windows = mouths.reshape(windows, SYNC_WINDOW * 3, *mouths.shape[-2:])  # rows are frame-major
    centre_mels = mels.view(windows, SYNC_WINDOW, *mels.shape[1:])[:, SYNC_WINDOW // 2]
    out = sync_expert(mouth_windows, centre_mels)
    if isinstance(out, (tuple, list)):
        out = F.cosine_similarity(out[0], out[1], dim=1)
    return -torch.log(out.reshape(windows).clamp(1e-6, 1.0)).mean()


def _save_checkpoint(path: Path, model: DCK, disc: PatchDiscriminator, opt_g, opt_d, step: int) -> None:
    save_atomic({
        "format": CHECKPOINT_FORMAT,
        "kwargs": dict(model.init_kwargs),
        "step": step,
        "model": model.state_dict(),
        "disc": disc.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
    }, path)


def _load_checkpoint(path: Path, model: DCK, disc: PatchDiscriminator, opt_g, opt_d, device) -> int:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise DubberError(f"not a readable training checkpoint ({type(exc).__name__})", path) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DubberError("not a DCK training checkpoint", path)
    if state["kwargs"] != model.init_kwargs:
        raise DubberError(f"checkpoint was trained with {state['kwargs']}, not {model.init_kwargs}; "
                          "delete it or pass resume=False", path)
    model.load_state_dict(state["model"])
    disc.load_state_dict(state["disc"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    return int(state["step"])
