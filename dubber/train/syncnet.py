"""Train the SyncNet sync expert (dubber.eval.syncnet) on per-frame mouth crops and mel windows.

Training makes the decision evaluation makes. A batch holds batch_size / WINDOWS_PER_SEGMENT
stretches of clips; each gives WINDOWS_PER_SEGMENT 5-frame mouth windows centred on speech, and the
audio of every frame from SEARCH frames before its first window to SEARCH after its last. Each window must pick its own audio
among all the batch's audio (offset_choice_loss): the same clip at every offset the evaluation
searches (-15..15, the hard negatives) and the other segments' audio (other moments, other people).
Audio within NEAR_MISS frames of the truth is left out: evaluation counts those offsets as right.
Windows are centred on speech only: in a pause no offset is more right than another.
Identities are drawn with probability proportional to (frames of that identity) ** IDENTITY_POWER,
so one speaker who owns 90 % of the frames does not own 90 % of the training signal, nor just
1/identities of it.
"""

import datetime
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from dubber.checkpoint import load_package, save_model
from dubber.errors import DubberError
from dubber.train import hardware_description
from dubber.eval.syncnet import (MEL_WIDTH, MOUTH_FRAMES, MOUTH_H, MOUTH_W, N_MELS, OFFSETS, SyncNet,
                                 offset_choice_logits, window_tensor)

WINDOWS_PER_SEGMENT = 8  # mouth windows sharing one stretch of audio (its embeddings are computed once)
SEGMENT_SPREAD = 8  # frames: a segment's window centres lie within this many frames of the first
SEARCH = max(OFFSETS)  # frames: audio this far either side of a window is its hard negatives
NEAR_MISS = 1  # frames: offsets evaluation counts as a hit are no negatives
IDENTITY_POWER = 0.5  # identity drawn with probability ~ (its speech frames) ** this
SPEECH_FRACTION = 0.3  # a frame has speech when its loudness is this far from the clip's 5th to 95th percentile
BRIGHTNESS_JITTER = 0.1  # added to [0, 1] pixels, uniform +-
CONTRAST_JITTER = 0.2  # contrast scaled by 1 +- this
FLIP_PROBABILITY = 0.5
GRAD_CLIP_NORM = 5.0
BN_RECALIBRATION_BATCHES = 20  # un-augmented batches that set BatchNorm's statistics before saving


def speech_frames(mels: np.ndarray) -> np.ndarray:
    """mel windows [T, 80, 16] (log-mel, -4 = silence) -> bool [T]: frames whose centre 50 ms is speech."""
    middle = mels.shape[2] // 2
    loudness = mels[:, :, middle - 2:middle + 2].mean(axis=(1, 2))
    low, high = np.percentile(loudness, [5, 95])
    return loudness > low + SPEECH_FRACTION * (high - low)


def _check_clips(clips: Sequence[Dict[str, Any]]) -> List[int]:
    """Validate clip arrays; return the indices of clips with a 5-frame window centred on speech."""
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
        if mouths.shape[0] >= 2 * SEARCH + 1:  # room for every offset the evaluation searches
            usable.append(i)
    if not usable:
        raise DubberError(f"no training clip has the {2 * SEARCH + 1} frames an offset search needs")
    return usable


class _SegmentSampler:
    """Draws batches: identity, clip, a speech-centred stretch; its windows and all of its audio."""

    def __init__(self, clips, usable: List[int], rng):
        self.clips, self.rng = clips, rng
        half = MOUTH_FRAMES // 2
        self.centres: Dict[int, np.ndarray] = {}
        for i in usable:
            speech = speech_frames(clips[i]["mels"])
            speech[:half] = speech[len(speech) - half:] = False  # the window must fit in the clip
            if speech.any():
                self.centres[i] = np.flatnonzero(speech)
        by_identity: Dict[str, List[int]] = {}
        for i in self.centres:
            by_identity.setdefault(str(clips[i]["identity"]), []).append(i)
        if not by_identity:
            raise DubberError("no training clip has speech")
        self.identities = sorted(by_identity)
        self.by_identity = by_identity
        frames = np.array([sum(len(self.centres[i]) for i in by_identity[name]) for name in self.identities], float)
        weights = frames ** IDENTITY_POWER
        self.identity_probability = weights / weights.sum()

    def batch(self, segments: int):
        """-> mouth windows uint8 [B, 5, 48, 96, 3], mels float32 [A, 80, 16], target int64 [B]
        (each window's own audio row) and exclude bool [B, A] (near misses, see offset_choice_loss);
        B = segments * WINDOWS_PER_SEGMENT."""
        rng = self.rng
        windows, mels, rows = [], [], []  # rows: (clip, frame) of every audio row
        window_keys, target = [], []
        for _ in range(segments):
            identity = self.identities[rng.choice(len(self.identities), p=self.identity_probability)]
            pool = self.by_identity[identity]
            clip_id = pool[rng.integers(len(pool))]
            clip, centres = self.clips[clip_id], self.centres[clip_id]
            first = centres[rng.integers(len(centres))]
            near = centres[(centres >= first) & (centres < first + SEGMENT_SPREAD)]
            chosen = rng.choice(near, WINDOWS_PER_SEGMENT, replace=near.size < WINDOWS_PER_SEGMENT)
            frames = clip["mels"].shape[0]
            lo, hi = max(0, int(chosen.min()) - SEARCH), min(frames, int(chosen.max()) + SEARCH + 1)
            base = len(rows)
            mels.append(clip["mels"][lo:hi])
            rows += [(clip_id, t) for t in range(lo, hi)]
            for centre in chosen:
                start = int(centre) - MOUTH_FRAMES // 2
                windows.append(clip["mouths"][start:start + MOUTH_FRAMES])
                window_keys.append((clip_id, int(centre)))
                target.append(base + int(centre) - lo)
        row_clip = np.array([c for c, _ in rows])
        row_frame = np.array([t for _, t in rows])
        window_clip = np.array([c for c, _ in window_keys])
        window_centre = np.array([t for _, t in window_keys])
        # Audio of (nearly) the window's own moment of its own clip is not a negative -- in any
        # segment. The window's own target row is the one exception.
        exclude = ((window_clip[:, None] == row_clip[None, :])
                   & (np.abs(window_centre[:, None] - row_frame[None, :]) <= NEAR_MISS))
        target = np.array(target)
        exclude[np.arange(len(target)), target] = False
        return np.stack(windows), np.concatenate(mels).astype(np.float32), target, exclude


def _augment(windows: np.ndarray, rng) -> torch.Tensor:
    """uint8 [B, 5, H, W, 3] -> float [B, 15, H, W] in [0, 1], with one jitter/flip per example
    (all five frames alike, so the motion between them is untouched)."""
    batch = windows.shape[0]
    x = window_tensor(windows)  # [B, 5, 3, H, W]
    contrast = torch.from_numpy(rng.uniform(1 - CONTRAST_JITTER, 1 + CONTRAST_JITTER, batch)).float()
    brightness = torch.from_numpy(rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER, batch)).float()
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = ((x - mean) * contrast.view(-1, 1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1, 1)).clamp_(0, 1)
    flip = torch.from_numpy(rng.random(batch) < FLIP_PROBABILITY)
    x[flip] = x[flip].flip(-1)
    return x.reshape(batch, 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W)


@torch.no_grad()
def _recalibrate_batchnorm(model: SyncNet, sampler: _SegmentSampler, segments: int, device: torch.device) -> None:
    """Replace BatchNorm's running statistics (an average over the last ~10 steps, taken while the
    weights were still moving) with exact ones of the final weights on un-augmented data."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for _ in range(BN_RECALIBRATION_BATCHES):
        windows, mels, _, _ = sampler.batch(segments)
        model.embed_face(window_tensor(windows).reshape(len(windows), 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W).to(device))
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
                  seed: int = 0, data_meta: Optional[Dict[str, Any]] = None,
                  log: Callable[[str], None] = print) -> SyncNet:
    """Train a SyncNet for `steps` optimiser steps and save it to out_path (dubber.checkpoint format).

    clips: dicts with "mouths" uint8 [T, 48, 96, 3] RGB (dubber.eval.syncnet.mouths_from_faces),
    "mels" float32 [T, 80, 16] (dubber.audio.mel_windows at the frame times, width 16) and
    "identity" str; clips shorter than 31 frames are skipped. batch_size: mouth windows per step,
    WINDOWS_PER_SEGMENT per stretch of audio (see the module docstring for the objective).
    Every checkpoint_every steps the model, Adam state and step go to resume_path(out_path); with
    resume=True a run picks up from there (the saved run's model settings win over model_kwargs).
    BatchNorm statistics are recomputed on un-augmented batches before the final save.
    data_meta (plain values only) is stored with the clip counts under meta["data"].
    Returns the model in eval mode, its .meta holding data, steps, hardware, date and the last
    logged loss and picked fraction (windows whose own audio beat all the batch's other audio).
    """
    device = torch.device(device)
    out_path = Path(out_path)
    usable = _check_clips(clips)
    segments = max(1, batch_size // WINDOWS_PER_SEGMENT)

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
    sampler = _SegmentSampler(clips, usable, rng)
    data = {"clips": len(sampler.centres), "identities": len(sampler.identities),
            "frames": int(sum(clips[i]["mouths"].shape[0] for i in sampler.centres)), **(data_meta or {})}

    def save_state(step: int):
        save_model(model, state_path, meta={"data": data},
                   extra={"optimizer": optimizer.state_dict(), "step": step})

    running_loss, running_picked, count, last = 0.0, 0.0, 0, {}
    tic = time.time()
    for step in range(start_step + 1, steps + 1):
        windows, mels, target, exclude = sampler.batch(segments)
        faces = _augment(windows, rng).to(device)
        target, exclude = torch.from_numpy(target).to(device), torch.from_numpy(exclude).to(device)
        face_emb = model.embed_face(faces)
        audio_emb = model.embed_audio(torch.from_numpy(mels).view(-1, 1, N_MELS, MEL_WIDTH).to(device))
        logits = offset_choice_logits(face_emb, audio_emb, exclude)
        loss = F.cross_entropy(logits, target)  # offset_choice_loss, its logits kept for the log
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()

        running_picked += (logits.detach().argmax(dim=1) == target).float().mean().item()
        running_loss += loss.item()
        count += 1
        if step % log_every == 0 or step == steps:
            last = {"loss": running_loss / count, "picked": running_picked / count}
            log(f"step {step}/{steps}  loss {last['loss']:.4f}  own audio picked {last['picked']:.3f}  "
                f"{count / (time.time() - tic):.2f} steps/s")
            running_loss, running_picked, count, tic = 0.0, 0.0, 0, time.time()
        if step % checkpoint_every == 0 and step < steps:
            save_state(step)

    if start_step < steps:
        save_state(steps)
    # After the resumable state is saved: a resumed run continues from the training statistics.
    _recalibrate_batchnorm(model, sampler, segments, device)
    meta = {
        "data": data,
        "steps": steps,
        "batch_size": segments * WINDOWS_PER_SEGMENT,
        "lr": lr,
        "loss": (f"offset choice: each speech-centred window picks its audio among the same clip's "
                 f"offsets -{SEARCH}..{SEARCH} (+-{NEAR_MISS} left out) and the batch's other audio"),
        "hardware": hardware_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"final_{k}": v for k, v in last.items()},
    }
    save_model(model, out_path, meta=meta)
    model.meta = meta
    return model
