"""Recipe for the SyncNet lip-sync expert (dubber.backbones.syncnet): training makes the decision
evaluation makes.

A batch holds batch_size / WINDOWS_PER_SEGMENT stretches of clips; each gives WINDOWS_PER_SEGMENT
5-frame mouth windows centred on speech, and the audio of every frame from SEARCH frames before
its first window to SEARCH after its last. Each window must pick its own audio among all the
batch's audio (offset_choice_loss): the same clip at every offset the evaluation searches (the hard
negatives) and the other segments' audio (other moments, other people). Audio within NEAR_MISS
frames of the truth is left out: evaluation counts those offsets as right. Windows are centred on
speech only (dubber.audio.speech_frames): in a pause no offset is more right than another.
Identities are drawn with probability proportional to (speech frames) ** IDENTITY_POWER.
"""

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dubber.audio import N_MELS
from dubber.backbones.syncnet import (BASE_CHANNELS, EMBED_DIM, FACE_CROP, MOUTH_FRAMES, MOUTH_H, MOUTH_W,
                                      OFFSET_RANGE, SyncNet, mouths_from_faces, window_tensor)
from dubber.eval.sync import sync_scores
from dubber.face.crops import CropSpec
from dubber.train import distributed
from dubber.train.augment import Jitter, augment
from dubber.train.recipes import Recipe, recipe

BATCH_SIZE = 64  # mouth windows per step
LEARNING_RATE = 1e-4
WINDOWS_PER_SEGMENT = 8  # mouth windows sharing one stretch of audio (its embeddings are computed once)
SEGMENT_SPREAD = 8  # frames: a segment's window centres lie within this many frames of the first
SEARCH = OFFSET_RANGE  # frames: audio this far either side of a window is its hard negatives
NEAR_MISS = 1  # frames: offsets evaluation counts as a hit are no negatives
CONTRASTIVE_TEMPERATURE = 0.2  # cosines in [-1, 1] -> logits in [-5, 5]; 0.1 learnt slower on a synthetic task
BRIGHTNESS_JITTER = 0.1
CONTRAST_JITTER = 0.2
GRAD_CLIP_NORM = 5.0
BN_RECALIBRATION_BATCHES = 20  # un-augmented batches that set BatchNorm's statistics before shipping


def offset_choice_logits(face_emb: torch.Tensor, audio_emb: torch.Tensor, exclude: Optional[torch.Tensor] = None,
                         temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """Logits of each mouth window [B, D] over all audio rows [A, D] (unit norm): [B, A], -inf where
    exclude [B, A] marks rows that must not count as negatives."""
    logits = face_emb @ audio_emb.T / temperature
    return logits if exclude is None else logits.masked_fill(exclude, float("-inf"))


def offset_choice_loss(face_emb: torch.Tensor, audio_emb: torch.Tensor, target: torch.Tensor,
                       exclude: Optional[torch.Tensor] = None,
                       temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE over audio: each mouth window picks its own audio row (target [B]) among all it is shown.

    Why not Wav2Lip's BCE on one pair at a time: shown the same clip's audio at every offset the
    evaluation searches, the model is trained on the very decision offset search makes; on little
    data, BCE sits at log 2 for thousands of steps.
    """
    return F.cross_entropy(offset_choice_logits(face_emb, audio_emb, exclude, temperature), target)


@recipe
class SyncNetRecipe(Recipe):
    model = "syncnet"
    identity_power = 0.5
    select_metric = "val_offset_accuracy"
    select_mode = "max"
    ship_half = False

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    base_channels: int = BASE_CHANNELS
    embed_dim: int = EMBED_DIM
    temperature: float = CONTRASTIVE_TEMPERATURE
    init: str = ""  # path of a syncnet file to start from (fine-tuning) instead of a fresh model

    def crops(self) -> Sequence[CropSpec]:
        return [FACE_CROP]

    def build(self):
        return {"model": self.initialised(SyncNet(base_channels=self.base_channels, embed_dim=self.embed_dim), self.init)}

    def optimizers(self, modules):
        return {"model": torch.optim.Adam(modules["model"].parameters(), lr=self.lr)}

    def trained(self, modules):
        return {"model": _Embeddings(modules["model"])}

    def anchors(self, clip: dict) -> np.ndarray:
        """Speech frames a 5-frame window can be centred on, in clips long enough for the search."""
        frames = len(clip["mels"])
        if frames < 2 * SEARCH + 1:
            return np.zeros(0, int)
        speech = np.asarray(clip["speech"], bool).copy()
        half = MOUTH_FRAMES // 2
        speech[:half] = speech[frames - half:] = False
        return np.flatnonzero(speech)

    def segments(self, sampler, rng: np.random.Generator, count: Optional[int] = None):
        """-> `count` (default batch_size; whole segments) mouth windows uint8 [B, 5, 48, 96, 3],
        mels float32 [A, 80, W], target int64 [B] (each window's own audio row) and exclude bool
        [B, A] (near misses)."""
        windows, mels, rows, keys, target = [], [], [], [], []
        for _ in range(max(1, (count or self.batch_size) // WINDOWS_PER_SEGMENT)):
            index, first = sampler.draw(rng)
            clip, centres = sampler.clips[index], sampler.anchors[index]
            near = centres[(centres >= first) & (centres < first + SEGMENT_SPREAD)]
            chosen = rng.choice(near, WINDOWS_PER_SEGMENT, replace=near.size < WINDOWS_PER_SEGMENT)
            frames = len(clip["mels"])
            lo, hi = max(0, int(chosen.min()) - SEARCH), min(frames, int(chosen.max()) + SEARCH + 1)
            base = len(rows)
            mels.append(clip["mels"][lo:hi])
            rows += [(index, t) for t in range(lo, hi)]
            faces = clip["crops"][FACE_CROP.key]
            for centre in chosen:
                start = int(centre) - MOUTH_FRAMES // 2
                windows.append(mouths_from_faces(faces[start:start + MOUTH_FRAMES]))
                keys.append((index, int(centre)))
                target.append(base + int(centre) - lo)
        row_clip, row_frame = np.array(rows).T
        window_clip, window_centre = np.array(keys).T
        # Audio of (nearly) the window's own moment of its own clip is no negative -- in any
        # segment. The window's own target row is the one exception.
        exclude = ((window_clip[:, None] == row_clip[None, :])
                   & (np.abs(window_centre[:, None] - row_frame[None, :]) <= NEAR_MISS))
        target = np.array(target)
        exclude[np.arange(len(target)), target] = False
        return np.stack(windows), np.concatenate(mels).astype(np.float32), target, exclude

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model = modules["model"]
        # Under torchrun: the step's windows over all processes (whole segments for each), each
        # process embedding its own shard of them and all of the audio, so every window still
        # picks among all of the step's audio.
        count = max(1, self.batch_size // WINDOWS_PER_SEGMENT) * WINDOWS_PER_SEGMENT * distributed.world_size()
        windows, mels, target, exclude = self.segments(sampler, rng, count)
        faces, _ = augment(window_tensor(windows).to(device), rng,
                           Jitter(BRIGHTNESS_JITTER, CONTRAST_JITTER, 0.0))
        faces = distributed.shard(faces.reshape(len(windows), 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W))
        target, exclude = distributed.shard(torch.from_numpy(target)), distributed.shard(torch.from_numpy(exclude))
        target, exclude = target.to(device), exclude.to(device)
        face_emb, audio_emb = model(faces, torch.from_numpy(mels).view(-1, 1, N_MELS, mels.shape[-1]).to(device))
        logits = offset_choice_logits(face_emb, audio_emb, exclude, self.temperature)
        loss = F.cross_entropy(logits, target)  # offset_choice_loss, its logits kept for the log
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizers["model"].step()
        picked = (logits.detach().argmax(dim=1) == target).float().mean().item()
        return {"loss": loss.item(), "picked": picked}

    def validate(self, modules, clips, device) -> Dict[str, float]:
        """Mean per-window offset accuracy over speech windows of the held-out clips."""
        model, accuracy = modules["model"], []
        for clip in clips:
            if len(clip["mels"]) < 2 * SEARCH + 1:
                continue
            scores = sync_scores(model, mouths_from_faces(clip["crops"][FACE_CROP.key]), clip["mels"],
                                 speech=clip["speech"])
            if np.isfinite(scores["offset_accuracy_speech"]):
                accuracy.append(scores["offset_accuracy_speech"])
        return {"val_offset_accuracy": float(np.mean(accuracy)) if accuracy else float("nan")}

    @torch.no_grad()
    def finish(self, modules, sampler, rng, device) -> None:
        """Replace BatchNorm's running statistics (an average over the last ~10 steps, taken while
        the weights were still moving) with exact ones of the final weights on un-augmented data."""
        model = modules["model"]
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        model.train()
        for _ in range(BN_RECALIBRATION_BATCHES):
            windows, mels, _, _ = self.segments(sampler, rng)
            model.embed_face(window_tensor(windows).reshape(len(windows), 3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W).to(device))
            model.embed_audio(torch.from_numpy(mels).view(-1, 1, N_MELS, mels.shape[-1]).to(device))
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


class _Embeddings(torch.nn.Module):
    """SyncNet's two encoders in one forward, the call DistributedDataParallel sees: mouth windows
    [B, 15, 48, 96], mels [A, 1, 80, W] -> unit embeddings [B, D], [A, D]."""

    def __init__(self, model: SyncNet):
        super().__init__()
        self.model = model

    def forward(self, faces: torch.Tensor, mels: torch.Tensor):
        return self.model.embed_face(faces), self.model.embed_audio(mels)
