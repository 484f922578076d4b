"""Recipe of the lip reader (dubber.backbones.lipreader): cross-entropy over GRID's words.

A sample is one word a GRID clip's alignment places wholly within its run of frames
(dubber.data.words_in_run): its frames resampled to WORD_FRAMES, grey lips crops, mirrored at
random (a mirrored mouth says the same word), colour jitter. Clips without words (the wild
corpus) give no samples. Validation: word accuracy on GRID's held-out sentences ("grid_val"),
which selects the shipped step.
"""

from typing import ClassVar, Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dubber.backbones.lipreader import MOUTH_CROP, LipReader, read_words, word_frames
from dubber.face.crops import CropSpec
from dubber.train import distributed, flow
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.recipes import Recipe, recipe

BATCH_SIZE = 32  # words a step
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
COLOUR_JITTER = 0.1


def word_batch(clips: Sequence[dict], picks, key: str = MOUTH_CROP.key) -> np.ndarray:
    """The frames of picked words [(clip index, word index)] -> uint8 RGB [N, WORD_FRAMES, S, S, 3]."""
    return np.stack([clips[c]["crops"][key][word_frames(*clips[c]["words"][w][:2])] for c, w in picks])


@recipe
class LipReaderRecipe(Recipe):
    model = "lipreader"
    identity_power = 0.0
    select_metric = "val_word_accuracy"
    select_mode = "max"
    ship_half: ClassVar[bool] = False  # small
    validation_clips: ClassVar[int] = 100  # every held-out GRID sentence
    validation_split: ClassVar[str] = "grid_val"

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    colour_jitter: float = COLOUR_JITTER

    def crops(self) -> Sequence[CropSpec]:
        return [MOUTH_CROP]

    def build(self) -> Dict[str, torch.nn.Module]:
        return {"model": LipReader()}

    def optimizers(self, modules):
        return {"model": torch.optim.AdamW(modules["model"].parameters(), lr=self.lr, weight_decay=self.weight_decay)}

    def anchors(self, clip: dict) -> np.ndarray:
        """The first frame of each word said within the clip's run."""
        return np.array([first for first, _, _ in clip.get("words", ())], int)

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model = modules["model"]
        picks, labels = [], []
        for _ in range(self.batch_size * distributed.world_size()):
            index, first = sampler.draw(rng)
            words = sampler.clips[index]["words"]
            w = next(k for k, (start, _, _) in enumerate(words) if start == first)
            picks.append((index, w))
            labels.append(model.vocabulary.index(words[w][2]))
        images = to_float(word_batch(sampler.clips, picks), device)  # [N, T, 3, S, S]
        jitter = Jitter(self.colour_jitter, self.colour_jitter, self.colour_jitter)
        images, _ = augment(images, rng, jitter)
        grey = flow.grey(images)
        target = torch.tensor(labels, device=device)
        logits = model(distributed.shard(grey))
        target = distributed.shard(target)
        loss = F.cross_entropy(logits, target)
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        return {"ce": loss.item(), "accuracy": (logits.argmax(1) == target).float().mean().item()}

    def validate(self, modules, clips, device) -> Dict[str, float]:
        return {"val_word_accuracy": word_accuracy(modules["model"], clips, device)}


def word_accuracy(model: LipReader, clips: Sequence[dict], device, key: str = MOUTH_CROP.key) -> float:
    """The fraction of the clips' aligned words the model reads right (0 when there are none)."""
    picks = [(c, w) for c, clip in enumerate(clips) for w in range(len(clip.get("words", ())))]
    if not picks:
        return 0.0
    read = read_words(model, word_batch(clips, picks, key), device)
    return float(np.mean([word == clips[c]["words"][w][2] for word, (c, w) in zip(read, picks)]))
