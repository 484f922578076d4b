"""Recipes for the reference backbones of dubber.backbones.toy: plain L1 reconstruction of the
lower half, with identity inputs built exactly as inference builds them (a distant frame for
toy_frame; the clip's first frame for toy_clip, whose windows of 16 frames carry no state across
samples: each sample starts from a fresh state, as a run does after a gap)."""

from typing import ClassVar, Sequence

import numpy as np
import torch

from dubber.backbones.toy import ToyClip, ToyFrame, lower_half
from dubber.face.crops import CropSpec
from dubber.train import distributed
from dubber.train.augment import augment, to_float
from dubber.train.recipes import Recipe, recipe
from dubber.train.validate import generator_figures

LEARNING_RATE = 1e-3
MIN_FRAME_GAP = 5  # frames between a toy_frame target and its identity frame


class _ToyRecipe(Recipe):
    """Shared by both toys: a batch of windows, L1 on the lower half, validation by the runner."""

    select_metric = "val_l1_lower"
    window = 1
    backbone: ClassVar[type] = ToyFrame  # the model this recipe trains

    def crops(self) -> Sequence[CropSpec]:
        return [self.backbone.crop]

    def build(self):
        return {"model": self.backbone()}

    def optimizers(self, modules):
        return {"model": torch.optim.Adam(modules["model"].parameters(), lr=self.lr)}

    def anchors(self, clip: dict) -> np.ndarray:
        frames = len(clip["mels"])
        return np.arange(frames - self.window + 1) if frames >= max(self.window, 2 * MIN_FRAME_GAP) else np.zeros(0, int)

    def identity_frame(self, frames: int, start: int, rng: np.random.Generator) -> int:
        raise NotImplementedError

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model = modules["model"]
        key = self.backbone.crop.key
        samples, identities, mels = [], [], []
        for _ in range(self.batch_size * distributed.world_size()):  # the step's batch; this process trains a shard
            index, start = sampler.draw(rng)
            clip = sampler.clips[index]
            crops = clip["crops"][key]
            samples.append(crops[start:start + self.window])
            identities.append(crops[self.identity_frame(len(crops), start, rng)])
            mels.append(clip["mels"][start:start + self.window])
        pixels = to_float(np.concatenate([np.stack(samples), np.stack(identities)[:, None]], axis=1), device)
        pixels, _ = augment(pixels, rng)
        pixels, mels = distributed.shard(pixels), distributed.shard(np.stack(mels))
        targets, identity = pixels[:, :-1], pixels[:, -1]
        mel = torch.from_numpy(mels).to(device).float().unsqueeze(2)
        generated = model(targets, mel, identity).images
        loss = (lower_half(generated) - lower_half(targets)).abs().mean()
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        return {"l1": loss.item()}

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)


@recipe
class ToyFrameRecipe(_ToyRecipe):
    model = "toy_frame"
    batch_size: int = 8
    lr: float = LEARNING_RATE

    def identity_frame(self, frames, start, rng):
        candidates = np.flatnonzero(np.abs(np.arange(frames) - start) >= MIN_FRAME_GAP)
        return int(candidates[rng.integers(candidates.size)])


@recipe
class ToyClipRecipe(_ToyRecipe):
    model = "toy_clip"
    window = ToyClip.window
    backbone = ToyClip
    batch_size: int = 2
    lr: float = LEARNING_RATE

    def identity_frame(self, frames, start, rng):
        return 0  # conditioning CONDITION_FIRST_FACE
