"""DCK: audio-driven talking faces with dynamic convolution kernels (Ye et al., IEEE TMM 2022).

An adapted U-Net over the face crop (5 down-sampling, 4 middle, 5 up-sampling layers). The 4
middle layers are 1x1 convolutions whose kernels and biases are inferred, per frame, by fully
connected networks from an audio embedding; every other kernel is static. The network outputs an
attention mask alpha and a motion image M, and the result is I' = I * (1 - alpha) + M * alpha, so
pixels the network leaves alone (alpha = 0) are the blend base I's: the input's own outside the
mouth region (which pastes straight back), another frame's mouth inside it (see DCK).

Differences from the paper, all forced by what we have: 128x128 crops by default (CPU training;
the paper uses 256), a 128-wide middle (paper: 256) so the shipped file stays small, the audio
encoder is trained from scratch (the paper reuses Wav2Lip's pre-trained one), and the input is the
frame with its lower half masked plus a reference frame of the same person (Wav2Lip-style), because
we train self-supervised on real video instead of on synthetic Wav2Lip pairs (dubber.train.recipes.dck).
"""

from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch import nn

from dubber.backbones import register
from dubber.backbones.base import CONDITION_CLOSED_MOUTH, Backbone, Generated
from dubber.backbones.blocks import (AUDIO_EMBED_DIM, LEAKY_SLOPE, AudioEncoder, ConvNormAct, DynamicConv1x1,
                                     ResidualBlock, UpConv)
from dubber.face.crops import CROP_BOX, CropSpec

SIZE = 128  # crop side in pixels; must be divisible by 2 ** (number of down-sampling layers)
ENCODER_WIDTHS = (16, 32, 64, 128, 128, 128)  # stem, then after each of the 5 down-sampling layers
N_DYNAMIC = 4  # middle layers with dynamic kernels
# Hidden width of each kernel generator. Its last layer emits C * (C + 1) values per layer and
# dominates the file size: 4 layers x 64 x 128 x 129 = 4.2 M parameters (8.5 MB in fp16).
KERNEL_HIDDEN = 64
# Residual blocks after the down-sampling layers at these depths (1-based): the cheap,
# low-resolution levels, where extra capacity costs little time per frame.
RESIDUAL_DEPTHS = (3, 4)

# The blend base I shows another frame's mouth inside this feathered ellipse over mouth and chin
# (crop fractions; feather in units of the radius): the frame's own mouth speaks other words.
MOUTH_REGION_CENTRE, MOUTH_REGION_RADII = (0.5, 0.80), (0.30, 0.22)
MOUTH_REGION_FEATHER = 0.3


def blend(faces: torch.Tensor, alpha: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """I' = I * (1 - alpha) + M * alpha.  faces, motion [B, 3, S, S]; alpha [B, 1, S, S] in [0, 1]."""
    return faces * (1 - alpha) + motion * alpha


@lru_cache(maxsize=8)
def mouth_region(size: int, device=None) -> torch.Tensor:
    """Feathered ellipse over mouth and chin: [1, 1, S, S] in [0, 1].

    Only this region of the blend base comes from the mouth donor, so α learns to cover the mouth
    and nothing else; swapping the whole lower half taught α a hard edge across the nose and
    blurred the cheeks. Built once per size and device (shared: do not modify it in place).
    """
    (cx, cy), (rx, ry) = MOUTH_REGION_CENTRE, MOUTH_REGION_RADII
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size, device=device), torch.linspace(0, 1, size, device=device),
                            indexing="ij")
    distance = torch.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    return ((1 - distance) / MOUTH_REGION_FEATHER + 0.5).clamp(0, 1)[None, None]


def with_mouth_of(faces: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
    """The blend base: faces [B, 3, S, S] with the mouth_region of donors [B or 1, 3, S, S]."""
    region = mouth_region(faces.shape[-1], faces.device).to(faces.dtype)
    return faces * (1 - region) + donors * region


def mask_lower_half(faces: torch.Tensor) -> torch.Tensor:
    """Zero the lower half of the crops (where the mouth is): [B, 3, S, S] -> [B, 3, S, S]."""
    masked = faces.clone()
    masked[:, :, faces.shape[2] // 2:] = 0
    return masked


@register
class DCK(Backbone):
    """forward(faces [B,T,3,S,S], mels [B,T,1,80,16], identity [B,3,S,S], mouth_donors=None)
    -> Generated(images, alpha), frame by frame (window 1; T > 1 is a batch of frames).

    faces are the frames to re-voice, identity a frame of the same person (the reference: texture);
    all RGB in [0, 1]. The blend base I is faces with the mouth of mouth_donors ([B,T,3,S,S];
    default: the identity frame), never the frame's own mouth, which speaks other words and would
    show through I * (1 - alpha). Output images [B,T,3,S,S] in [0, 1] and alpha [B,T,1,S,S].
    Every width is a constructor argument, so a checkpoint describes its model completely.
    """

    name = "dck"
    crop = CropSpec(CROP_BOX, SIZE)
    conditioning = CONDITION_CLOSED_MOUTH
    returns_alpha = True

    def __init__(self, size: int = SIZE, encoder_widths: Sequence[int] = ENCODER_WIDTHS,
                 n_dynamic: int = N_DYNAMIC, kernel_hidden: int = KERNEL_HIDDEN,
                 residual_depths: Sequence[int] = RESIDUAL_DEPTHS):
        super().__init__()
        widths, n_down = tuple(encoder_widths), len(encoder_widths) - 1
        if size % 2 ** n_down:
            raise ValueError(f"DCK crop size must be divisible by {2 ** n_down}, got {size}")
        self.crop = CropSpec(CROP_BOX, size)
        middle = widths[-1]

        self.stem = ConvNormAct(6, widths[0], 3)
        self.down = nn.ModuleList()
        for depth in range(1, n_down + 1):
            layers = [ConvNormAct(widths[depth - 1], widths[depth], 3, stride=2)]
            if depth in residual_depths:
                layers.append(ResidualBlock(widths[depth]))
            self.down.append(nn.Sequential(*layers))

        self.audio_encoder = AudioEncoder(AUDIO_EMBED_DIM)
        self.dynamic = nn.ModuleList(
            DynamicConv1x1(middle, middle, AUDIO_EMBED_DIM, kernel_hidden) for _ in range(n_dynamic))
        self.dynamic_norms = nn.ModuleList(nn.BatchNorm2d(middle) for _ in range(n_dynamic))
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

        # Up-sampling layer at depth d takes the map from depth d (the middle's output at the
        # bottom) to depth d-1, concatenated with the encoder's skip at depth d-1.
        self.up = nn.ModuleList()
        in_channels = middle
        for depth in range(n_down, 0, -1):
            out_channels = widths[depth - 1]
            self.up.append(UpConv(in_channels, out_channels))
            in_channels = 2 * out_channels
        # Channel 0: alpha logits; channels 1-3: motion image logits. No norm: plain output layer.
        self.head = nn.Conv2d(in_channels, 4, 3, padding=1)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None, mouth_donors: Optional[torch.Tensor] = None) -> Generated:
        if identity is None:
            raise ValueError("DCK needs an identity frame (its reference)")
        size = self.crop.size
        if faces.dim() != 5 or faces.shape[2:] != (3, size, size) or identity.shape != (faces.shape[0], 3, size, size):
            raise ValueError(f"faces must be [B, T, 3, {size}, {size}] and identity [B, 3, {size}, {size}], "
                             f"got {tuple(faces.shape)} and {tuple(identity.shape)}")
        batch, frames = faces.shape[:2]
        flat = faces.flatten(0, 1)
        references = identity[:, None].expand(-1, frames, -1, -1, -1).flatten(0, 1)
        donors = references if mouth_donors is None else mouth_donors.flatten(0, 1)
        base = with_mouth_of(flat, donors)
        alpha, motion = self.alpha_motion(base, mels.flatten(0, 1), references)
        images = blend(base, alpha, motion)
        return Generated(images=images.view(faces.shape), alpha=alpha.view(batch, frames, 1, size, size))

    def alpha_motion(self, faces: torch.Tensor, mels: torch.Tensor, references: torch.Tensor):
        """-> alpha [B, 1, S, S], motion image M [B, 3, S, S], both in [0, 1]."""
        x = torch.cat([mask_lower_half(faces), references], dim=1)
        skips = [self.stem(x)]
        for layer in self.down:
            skips.append(layer(skips[-1]))

        audio = self.audio_encoder(mels)
        x = skips.pop()
        for conv, norm in zip(self.dynamic, self.dynamic_norms):
            x = self.act(norm(conv(x, audio)))

        for layer in self.up:
            x = torch.cat([layer(x), skips.pop()], dim=1)
        out = torch.sigmoid(self.head(x))
        return out[:, :1], out[:, 1:]
