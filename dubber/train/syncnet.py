"""Train the SyncNet sync expert (dubber.eval.syncnet) on per-frame mouth crops and mel windows.

Each example is 5 consecutive mouth frames; its candidates are the mel window of the middle frame
(the positive) and NEGATIVES windows of the same clip at least NEGATIVE_MIN_OFFSET frames away,
plus every other example's candidates in the batch. Negatives from the same clip force the model to
read the lips' timing, not who is talking.
Identities are drawn uniformly, then a clip of that identity, so a speaker who owns 90 % of the
clips does not own 90 % of the training signal.
"""

import datetime
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from dubber.checkpoint import load_package, save_model
from dubber.errors import DubberError
from dubber.train import hardware_description
from dubber.eval.syncnet import (MEL_WIDTH, MOUTH_FRAMES, MOUTH_H, MOUTH_W, N_MELS, OFFSETS, SyncNet,
                                 offset_contrastive_loss)

NEGATIVES = 4  # same-clip wrong-offset mel windows per example
NEGATIVE_MIN_OFFSET = 5  # frames: one whole 5-frame window away, so no negative overlaps the positive's lips
NEGATIVE_MAX_OFFSET = max(OFFSETS)  # frames: the range the evaluation searches
BRIGHTNESS_JITTER = 0.1  # added to [0, 1] pixels, uniform +-
CONTRAST_JITTER = 0.2  # contrast scaled by 1 +- this
FLIP_PROBABILITY = 0.5
GRAD_CLIP_NORM = 5.0
BN_RECALIBRATION_BATCHES = 20  # un-augmented batches that set BatchNorm's statistics before saving


def _check_clips(clips: Sequence[Dict[str, Any]], min_frames: int) -> List[int]:
    """Validate clip arrays; return the indices of clips long enough to give a window and its negatives."""
    usable = []
    for i, clip in enumerate(clips):
        mouths, mels = clip.get("mouths"), clip.get("mels")
        if mouths is None or mels is None or "identity" not in clip:
            raise DubberError(f"training clip {i} needs 'mouths', 'mels' and 'identity'")
        if mouths.dtype != np.uint8 or mouths.ndim != 4 or mouths.shape[1:] != (MOUTH_H, MOUTH_W, 3):
            raise DubberError(f"training clip {i}: mouths must be uint8 [T, {MOUTH_H}, {MOUTH_W}, 3], got "
                              f"{mouths.dtype} {mouths.shape}")
        if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_WIDTH) or mels.shape[0] != mouths.shape[0]:
            raise DubberError(f"training clip {i}: mels must be [T, {N_MELS}, {MEL_WIDTH}] with T = "
                              f"{mouths.shape[0]} mouth frames, got {mels.shape}")
        if mouths.shape[0] >= min_frames:
            usable.append(i)
    if not usable:
        raise DubberError(f"no training clip has the {min_frames} frames a window and its negatives need")
    return usable


class _Sampler:
    """Draws training examples: identity uniformly, then a clip, then a window and its negatives."""

    def __init__(self, clips, usable: List[int], negatives: int, min_offset: int, max_offset: int, rng):
        self.clips, self.negatives, self.rng = clips, negatives, rng
        self.min_offset, self.max_offset = min_offset, max_offset
        by_identity: Dict[str, List[int]] = {}
        for i in usable:
            by_identity.setdefault(str(clips[i]["identity"]), []).append(i)
        self.identities = sorted(by_identity)
        self.by_identity = by_identity

    def batch(self, batch_size: int):
        """-> mouth windows uint8 [B, 5, 48, 96, 3], mel candidates float32 [B, 1 + negatives, 80, 16],
        and exclude bool [B, B * (1 + negatives)] (see offset_contrastive_loss)."""
        rng = self.rng
        windows, candidates, clip_ids, frame_ids = [], [], [], []
        for _ in range(batch_size):
            identity = self.identities[rng.integers(len(self.identities))]
            pool = self.by_identity[identity]
            clip_id = pool[rng.integers(len(pool))]
            clip = self.clips[clip_id]
            frames = clip["mouths"].shape[0]
            start = int(rng.integers(frames - MOUTH_FRAMES + 1))
            middle = start + MOUTH_FRAMES // 2
            distance = np.abs(np.arange(frames) - middle)
            wrong = np.flatnonzero((distance >= self.min_offset) & (distance <= self.max_offset))
            if wrong.size == 0:  # a long-enough clip always has one within min_offset..frames
                wrong = np.flatnonzero(distance >= self.min_offset)
            negatives = rng.choice(wrong, self.negatives, replace=wrong.size < self.negatives)
            audio_frames = np.concatenate([[middle], negatives])
            windows.append(clip["mouths"][start:start + MOUTH_FRAMES])
            candidates.append(clip["mels"][audio_frames])
            clip_ids.append(clip_id)
            frame_ids.append(audio_frames)
        clip_ids, frame_ids = np.array(clip_ids), np.stack(frame_ids)
        middles = frame_ids[:, 0]
        # Another row's audio from (nearly) this row's moment of the same clip is no negative.
        same_clip = clip_ids[:, None, None] == clip_ids[None, :, None]
        too_close = np.abs(frame_ids[None, :, :] - middles[:, None, None]) < self.min_offset
        exclude = same_clip & too_close
        exclude[np.arange(batch_size), np.arange(batch_size), 0] = False  # the row's own positive
        return (np.stack(windows), np.stack(candidates).astype(np.float32),
                exclude.reshape(batch_size, batch_size * (1 + self.negatives)))


def _augment(windows: np.ndarray, rng) -> torch.Tensor:
    """uint8 [B, 5, H, W, 3] -> float [B, 15, H, W] in [0, 1], with one jitter/flip per example
    (all five frames alike, so the motion between them is untouched)."""
    batch = windows.shape[0]
    x = torch.from_numpy(windows).float().div_(255.0).permute(0, 1, 4, 2, 3)  # [B, 5, 3, H, W]
    contrast = torch.from_numpy(rng.uniform(1 - CONTRAST_JITTER, 1 + CONTRAST_JITTER, batch)).float()
    brightness = torch.from_numpy(rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER, batch)).float()
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = ((x - mean) * contrast.view(-1, 1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1, 1)).clamp_(0, 1)
    flip = torch.from_numpy(rng.random(batch) < FLIP_PROBABILITY)
    x[flip] = x[flip].flip(-1)
    return x.reshape(batch, 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W)


@torch.no_grad()
def _recalibrate_batchnorm(model: SyncNet, sampler: "_Sampler", batch_size: int, device: torch.device) -> None:
    """Replace BatchNorm's running statistics (an average over the last ~10 steps, taken while the
    weights were still moving) with exact ones of the final weights on un-augmented data."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for _ in range(BN_RECALIBRATION_BATCHES):
        windows, mels, _ = sampler.batch(batch_size)
        faces = torch.from_numpy(windows).float().div_(255.0).permute(0, 1, 4, 2, 3)
        model.embed_face(faces.reshape(batch_size, 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W).to(device))
        model.embed_audio(torch.from_numpy(mels).view(-1, 1, N_MELS, MEL_WIDTH).to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def resume_path(out_path: Union[str, Path]) -> Path:
    """Where train_syncnet keeps its resumable state (model + optimizer + step) beside out_path."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".resume.pt")


def train_syncnet(clips: Sequence[Dict[str, Any]], out_path: Union[str, Path], steps: int, batch_size: int = 64,
                  lr: float = 1e-4, device: Union[str, torch.device] = "cpu", log_every: int = 100,
                  checkpoint_every: int = 1000, resume: bool = True, *, model_kwargs: Optional[dict] = None,
                  negatives: int = NEGATIVES, min_negative_offset: int = NEGATIVE_MIN_OFFSET,
                  max_negative_offset: int = NEGATIVE_MAX_OFFSET, seed: int = 0,
                  data_meta: Optional[Dict[str, Any]] = None,
                  log: Callable[[str], None] = print) -> SyncNet:
    """Train a SyncNet for `steps` optimiser steps and save it to out_path (dubber.checkpoint format).

    clips: dicts with "mouths" uint8 [T, 48, 96, 3] RGB (dubber.eval.syncnet.mouths_from_faces),
    "mels" float32 [T, 80, 16] (dubber.audio.mel_windows at the frame times, width 16) and
    "identity" str. Loss: offset_contrastive_loss over the positive, `negatives` same-clip windows
    min_negative_offset..max_negative_offset frames away and the rest of the batch's candidates.
    Every checkpoint_every steps the model, Adam state and step go to resume_path(out_path); with
    resume=True a run picks up from there (the saved run's model settings win over model_kwargs).
    BatchNorm statistics are recomputed on un-augmented batches before the final save.
    data_meta (plain values only) is stored with the clip counts under meta["data"].
    Returns the model in eval mode, its .meta holding data, steps, hardware, date and the last
    logged loss and sync-picked accuracy.
    """
    device = torch.device(device)
    out_path = Path(out_path)
    min_frames = max(MOUTH_FRAMES, 2 * min_negative_offset + 1)
    usable = _check_clips(clips, min_frames)

    kwargs = dict(model_kwargs or {})
    start_step, package = 0, None
    state_path = resume_path(out_path)
    if resume and state_path.is_file():
        package = load_package(state_path)
        kwargs = package["kwargs"]
        start_step = int(package["step"])
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = SyncNet(**kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if package is not None:
        model.load_state_dict(package["state"])
        optimizer.load_state_dict(package["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        log(f"resumed from {state_path} at step {start_step}")
    model.to(device).train()
    for state in optimizer.state.values():  # Adam moments follow the model to the device
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)

    # A different stream after a resume, so a resumed run doesn't replay the batches it has seen.
    rng = np.random.default_rng([seed, start_step])
    sampler = _Sampler(clips, usable, negatives, min_negative_offset, max_negative_offset, rng)
    data = {"clips": len(usable), "identities": len(sampler.identities),
            "frames": int(sum(clips[i]["mouths"].shape[0] for i in usable)), **(data_meta or {})}

    def save_state(step: int):
        save_model(model, state_path, meta={"data": data},
                   extra={"optimizer": optimizer.state_dict(), "step": step})

    running_loss, running_accuracy, count, last = 0.0, 0.0, 0, {}
    tic = time.time()
    for step in range(start_step + 1, steps + 1):
        windows, mels, exclude = sampler.batch(batch_size)
        faces = _augment(windows, rng).to(device)
        mels = torch.from_numpy(mels).to(device)
        exclude = torch.from_numpy(exclude).to(device)
        face_emb = model.embed_face(faces)
        audio_emb = model.embed_audio(mels.view(-1, 1, N_MELS, MEL_WIDTH)).view(batch_size, 1 + negatives, -1)
        loss = offset_contrastive_loss(face_emb, audio_emb, exclude=exclude)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()

        with torch.no_grad():  # did the window's own audio beat every candidate in the batch?
            similarity = (face_emb @ audio_emb.reshape(-1, audio_emb.shape[-1]).T).masked_fill(exclude, -2.0)
            target = torch.arange(batch_size, device=device) * (1 + negatives)
            running_accuracy += (similarity.argmax(dim=1) == target).float().mean().item()
        running_loss += loss.item()
        count += 1
        if step % log_every == 0 or step == steps:
            last = {"loss": running_loss / count, "accuracy": running_accuracy / count}
            log(f"step {step}/{steps}  loss {last['loss']:.4f}  sync-picked {last['accuracy']:.3f}  "
                f"{count / (time.time() - tic):.2f} steps/s")
            running_loss, running_accuracy, count, tic = 0.0, 0.0, 0, time.time()
        if step % checkpoint_every == 0 and step < steps:
            save_state(step)

    if start_step < steps:
        save_state(steps)
    # After the resumable state is saved: a resumed run continues from the training statistics.
    _recalibrate_batchnorm(model, sampler, batch_size, device)
    meta = {
        "data": data,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "loss": (f"offset-contrastive, {negatives} same-clip negatives {min_negative_offset}-{max_negative_offset} "
                 "frames away + in-batch"),
        "hardware": hardware_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"final_{k}": v for k, v in last.items()},
    }
    save_model(model, out_path, meta=meta)
    model.meta = meta
    return model
