"""Two reference backbones for the temporal contract: small, trainable in seconds, and the
example to copy when adding a backbone (README, "Adding a backbone").

- `toy_frame`: window 1, stateless, conditioned on one closed-mouth frame per video (like DCK):
  re-draws the lower half of each box crop from the upper half, the identity frame and the audio.
- `toy_clip`: window 16 with 4 frames of overlap, stateful (a GRU state carried from window to
  window), conditioned on the first face (a photo's only frame): draws the lower half of the
  identity crop from the audio, through the recurrent state.

They are not meant to look good; they exist so that every path of the runner, the pipeline, eval
and the trainer is exercised by a model of each shape.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dubber.audio import MEL_WINDOW, N_MELS
from dubber.backbones import register
from dubber.backbones.base import CONDITION_CLOSED_MOUTH, CONDITION_FIRST_FACE, Backbone, Generated
from dubber.face.crops import CROP_BOX, CROP_FACE, CropSpec

FRAME_SIZE = 64  # crop side, pixels
FRAME_WIDTH = 16  # feature channels of toy_frame
CLIP_SIZE = 64
CLIP_HIDDEN = 32  # GRU width of toy_clip
CLIP_GRID = 8  # toy_clip draws its lower half on a CLIP_GRID x 2*CLIP_GRID grid, then upsamples


def lower_half(images: torch.Tensor) -> torch.Tensor:
    return images[..., images.shape[-2] // 2:, :]


def with_lower_half(images: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """images [..., 3, S, S] with rows S/2.. replaced by lower [..., 3, S/2, S]."""
    return torch.cat([images[..., : images.shape[-2] // 2, :], lower], dim=-2)


@register
class ToyFrame(Backbone):
    """forward(faces [B,1,3,S,S], mels [B,1,1,80,W], identity [B,3,S,S]) -> Generated(images)."""

    name = "toy_frame"
    crop = CropSpec(CROP_BOX, FRAME_SIZE)
    conditioning = CONDITION_CLOSED_MOUTH

    def __init__(self, size: int = FRAME_SIZE, width: int = FRAME_WIDTH, mel_width: int = MEL_WINDOW):
        super().__init__()
        self.crop = CropSpec(CROP_BOX, size)
        self.encode = nn.Conv2d(6, width, 3, padding=1)
        self.audio = nn.Linear(N_MELS * mel_width, width)
        self.decode = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        frames = faces.flatten(0, 1)
        references = identity[:, None].expand_as(faces).flatten(0, 1)
        masked = with_lower_half(frames, torch.zeros_like(lower_half(frames)))
        x = self.encode(torch.cat([masked, references], dim=1))
        x = F.leaky_relu(x + self.audio(mels.flatten(0, 1).flatten(1))[:, :, None, None], 0.2)
        drawn = torch.sigmoid(self.decode(x))
        return Generated(with_lower_half(frames, lower_half(drawn)).view(faces.shape))


@register
class ToyClip(Backbone):
    """forward(faces [B,16,3,S,S], mels [B,16,1,80,W], identity [B,3,S,S], state [1,B,H] or None)
    -> Generated(images, state=GRU state after the window's last frame)."""

    name = "toy_clip"
    crop = CropSpec(CROP_FACE, CLIP_SIZE)
    window = 16
    overlap = 4
    stateful = True
    conditioning = CONDITION_FIRST_FACE

    def __init__(self, size: int = CLIP_SIZE, hidden: int = CLIP_HIDDEN, mel_width: int = MEL_WINDOW):
        super().__init__()
        self.crop = CropSpec(CROP_FACE, size)
        self.audio = nn.Linear(N_MELS * mel_width, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.decode = nn.Linear(hidden, 3 * CLIP_GRID * 2 * CLIP_GRID)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        batch, frames, _, size, _ = faces.shape
        features = torch.tanh(self.audio(mels.flatten(2)))  # [B, T, H]
        hidden, state = self.rnn(features, state)
        delta = self.decode(hidden).view(batch * frames, 3, CLIP_GRID, 2 * CLIP_GRID)
        delta = F.interpolate(torch.tanh(delta), size=(size // 2, size), mode="bilinear", align_corners=False)
        base = identity[:, None].expand_as(faces).flatten(0, 1)
        lower = (lower_half(base) + 0.5 * delta).clamp(0, 1)
        return Generated(with_lower_half(base, lower).view(faces.shape), state=state)
