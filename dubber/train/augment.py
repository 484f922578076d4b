"""Training augmentation shared by every recipe: horizontal flips and colour jitter of images,
SpecAugment of log-mel windows.

Everything one sample is made of (target, reference, mouth donor, the frames of a window) gets the
same flip and jitter, so the target stays reachable from the inputs and motion between frames is
untouched. Jitter is pointwise about a fixed pivot (0.5) rather than the image mean, so two images
that agree somewhere still agree there afterwards.
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from dubber import audio

FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class Jitter:
    """Amplitudes: brightness added in [-b, b]; contrast and saturation factors in [1 - c, 1 + c]."""

    brightness: float = 0.08
    contrast: float = 0.08
    saturation: float = 0.08


def augment(images: torch.Tensor, rng: np.random.Generator, jitter: Jitter = Jitter(),
            flip_probability: float = FLIP_PROBABILITY) -> Tuple[torch.Tensor, torch.Tensor]:
    """images [N, K, 3, H, W] in [0, 1] (K images share one sample's draw) -> (images, flipped bool [N])."""
    count = images.shape[0]

    def draw(centre: float, amplitude: float) -> torch.Tensor:
        values = centre + rng.uniform(-amplitude, amplitude, count).astype(np.float32)
        return torch.from_numpy(values).to(images.device).view(-1, 1, 1, 1, 1)

    flipped = torch.from_numpy(rng.random(count) < flip_probability).to(images.device)
    images = torch.where(flipped.view(-1, 1, 1, 1, 1), images.flip(-1), images)
    images = (images - 0.5) * draw(1.0, jitter.contrast) + 0.5 + draw(0.0, jitter.brightness)
    grey = images.mean(dim=2, keepdim=True)
    images = ((images - grey) * draw(1.0, jitter.saturation) + grey).clamp_(0, 1)
    return images, flipped


def to_float(images: np.ndarray, device) -> torch.Tensor:
    """uint8 RGB [..., H, W, 3] -> float [..., 3, H, W] in [0, 1] on device."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.movedim(-1, -3).float().div_(255)


def spec_augment(mels: np.ndarray, rng: np.random.Generator, bands: int, frames: int) -> np.ndarray:
    """Each sample of mels [N, T, 80, W] with a random run of up to `bands` mel bands and one of up to
    `frames` mel frames set to silence (audio.MEL_MIN), the same for the T frames of a sample: the lips must
    be read from what remains."""
    mels = mels.copy()
    for i in range(len(mels)):
        for size, axis_length, axis in ((bands, mels.shape[2], 2), (frames, mels.shape[3], 3)):
            width = int(rng.integers(0, size + 1)) if size else 0
            if width:
                start = int(rng.integers(0, axis_length - width + 1))
                index = [slice(None)] * 4
                index[0], index[axis] = i, slice(start, start + width)
                mels[tuple(index)] = audio.MEL_MIN
    return mels
