"""A word-level lip reader for GRID's 51-word vocabulary, trained here on real mouths: CRAN's
lip-reading critic (Song et al., ../shared/papers: "a lip-reading model as a semantic lip
guidance") and the word accuracy the evaluation reports on real and generated mouths.

A word is the run of frames the alignment gives it (dubber.data.words_in_run), resampled to
WORD_FRAMES frames of the 64 px lips crop in grey (the mouth alone: the paper feeds "only the mouth
regions"). A 3D-convolution front end (LipNet-like, Assael et al. 2016) sees a few frames at a time,
a bidirectional GRU the whole word, and a linear layer scores the words.

forward(mouths [B, T, 1, S, S] grey in [0, 1]) -> logits [B, len(vocabulary)].
"""

from typing import Sequence

import numpy as np
import torch
from torch import nn

from dubber import media
from dubber.backbones import register
from dubber.checkpoint import SelfDescribing
from dubber.face.crops import CROP_LIPS, CropSpec

# GRID's grammar: command, colour, preposition, letter (no w), digit, adverb.
GRID_WORDS = tuple(sorted(
    "bin lay place set blue green red white at by in with".split()
    + [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) != "w"]
    + "zero one two three four five six seven eight nine again now please soon".split()))
MOUTH_CROP = CropSpec(CROP_LIPS, 64)
WORD_FRAMES = 12  # every word resampled to this many frames (GRID's words last 2-15 at 25 fps)
FRONT_WIDTHS = (32, 64, 96)
HIDDEN = 128


def word_frames(first: int, end: int, frames: int = WORD_FRAMES) -> np.ndarray:
    """Frame indices first .. end - 1 resampled (nearest) to `frames` of them: int [frames]."""
    return np.clip(np.round(np.linspace(first, end - 1, frames)).astype(int), first, end - 1)


def grey_mouths(crops: np.ndarray) -> np.ndarray:
    """Lips crops uint8 RGB [..., S, S, 3] -> float32 grey [..., 1, S, S] in [0, 1]."""
    grey = crops.astype(np.float32) @ np.array(media.LUMA, np.float32) / 255
    return grey[..., None, :, :]


@register
class LipReader(SelfDescribing):
    """See the module docstring."""

    name = "lipreader"
    role = "lip reader of GRID's words"  # what `dubber backbones` calls it
    crop = MOUTH_CROP

    def __init__(self, vocabulary: Sequence[str] = GRID_WORDS, widths: Sequence[int] = FRONT_WIDTHS,
                 hidden: int = HIDDEN, size: int = MOUTH_CROP.size):
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        layers, channels = [], 1
        for width in widths:  # space halved twice per layer (stride, then pooling); time kept
            layers += [nn.Conv3d(channels, width, (3, 3, 3), (1, 2, 2), (1, 1, 1), bias=False),
                       nn.BatchNorm3d(width), nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2))]
            channels = width
        self.front = nn.Sequential(*layers)
        side = size // 4 ** len(widths)
        self.project = nn.Linear(channels * side * side, 2 * hidden)
        self.recurrent = nn.GRU(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.classify = nn.Linear(2 * hidden, len(self.vocabulary))

    def forward(self, mouths: torch.Tensor) -> torch.Tensor:
        features = self.front(mouths.transpose(1, 2) * 2 - 1)  # [B, C, T, s, s]
        features = self.project(features.transpose(1, 2).flatten(2))  # [B, T, 2H]
        sequence, _ = self.recurrent(torch.relu(features))
        return self.classify(sequence.mean(1))


READ_BATCH = 64  # words a forward pass when reading


def read_words(model: LipReader, mouths: np.ndarray, device="cpu") -> list:
    """The words `model` reads in lips crops uint8 RGB [N, WORD_FRAMES, S, S, 3] (each word's
    frames, see word_frames): a list of N words of its vocabulary."""
    was_training = model.training
    model.eval()
    read = []
    with torch.no_grad():
        for start in range(0, len(mouths), READ_BATCH):
            grey = torch.from_numpy(grey_mouths(mouths[start:start + READ_BATCH])).to(device)
            read += [model.vocabulary[k] for k in model(grey).argmax(1).tolist()]
    model.train(was_training)
    return read
