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
we train self-supervised on real video instead of on synthetic Wav2Lip pairs (dubber.train.dck).
"""

from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from dubber.backbones import register
from dubber.backbones.base import CROP_BOX, Backbone, CropSpec, Generated
from dubber.backbones.blocks import (AUDIO_EMBED_DIM, LEAKY_SLOPE, AudioEncoder, ConvNormAct, DynamicConv1x1,
                                     ResidualBlock, UpConv)

SIZE = 128  # crop side in pixels; must be divisible by 2**N_DOWN
ENCODER_WIDTHS = (16, 32, 64, 128, 128, 128)  # stem, then after each of the 5 down-sampling layers
N_DOWN = len(ENCODER_WIDTHS) - 1
N_DYNAMIC = 4  # middle layers with dynamic kernels
MIDDLE_WIDTH = ENCODER_WIDTHS[-1]
# Hidden width of each kernel generator. Its last layer emits C * (C + 1) values per layer and
# dominates the file size: 4 layers x 64 x 128 x 129 = 4.2 M parameters (8.5 MB in fp16).
KERNEL_HIDDEN = 64
# Residual blocks after the down-sampling layers at these depths (1-based): the cheap,
# low-resolution levels, where extra capacity costs little time per frame.
RESIDUAL_DEPTHS = (3, 4)

DISC_WIDTHS = (32, 64, 128, 256)  # LSGAN patch discriminator

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
    """forward(faces [B,3,S,S], mels [B,1,80,16], references [B,3,S,S], mouth_donors=None)
    -> Generated(images, alpha).

    faces are the frames to re-voice, references frames of the same person (texture); all RGB in
    [0, 1]. The blend base I is faces with the mouth of mouth_donors (default: the references),
    never the frame's own mouth, which speaks other words and would show through I * (1 - alpha).
    Output images [B, 3, S, S] in [0, 1] and alpha [B, 1, S, S] in [0, 1].
    """

    name = "dck"
    crop = CropSpec(CROP_BOX, SIZE)
    mel_width = 16
    needs_reference = True
    returns_alpha = True

    def __init__(self, size: int = SIZE):
        super().__init__(size=size)
        if size % 2 ** N_DOWN:
            raise ValueError(f"DCK crop size must be divisible by {2 ** N_DOWN}, got {size}")
        self.crop = CropSpec(CROP_BOX, size)
        widths = ENCODER_WIDTHS

        self.stem = ConvNormAct(6, widths[0], 3)
        self.down = nn.ModuleList()
        for depth in range(1, N_DOWN + 1):
            layers = [ConvNormAct(widths[depth - 1], widths[depth], 3, stride=2)]
            if depth in RESIDUAL_DEPTHS:
                layers.append(ResidualBlock(widths[depth]))
            self.down.append(nn.Sequential(*layers))

        self.audio_encoder = AudioEncoder(AUDIO_EMBED_DIM)
        self.dynamic = nn.ModuleList(
            DynamicConv1x1(MIDDLE_WIDTH, MIDDLE_WIDTH, AUDIO_EMBED_DIM, KERNEL_HIDDEN) for _ in range(N_DYNAMIC))
        self.dynamic_norms = nn.ModuleList(nn.BatchNorm2d(MIDDLE_WIDTH) for _ in range(N_DYNAMIC))
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

        # Up-sampling layer at depth d takes the map from depth d (the middle's output at the
        # bottom) to depth d-1, concatenated with the encoder's skip at depth d-1.
        self.up = nn.ModuleList()
        in_channels = MIDDLE_WIDTH
        for depth in range(N_DOWN, 0, -1):
            out_channels = widths[depth - 1]
            self.up.append(UpConv(in_channels, out_channels))
            in_channels = 2 * out_channels
        # Channel 0: alpha logits; channels 1-3: motion image logits. No norm: plain output layer.
        self.head = nn.Conv2d(in_channels, 4, 3, padding=1)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, references: Optional[torch.Tensor] = None,
                mouth_donors: Optional[torch.Tensor] = None) -> Generated:
        if references is None:
            raise ValueError("DCK needs reference frames")
        size = self.crop.size
        if faces.shape[1:] != (3, size, size) or references.shape != faces.shape:
            raise ValueError(f"faces and references must be [B, 3, {size}, {size}], "
                             f"got {tuple(faces.shape)} and {tuple(references.shape)}")
        base = with_mouth_of(faces, references if mouth_donors is None else mouth_donors)
        alpha, motion = self.alpha_motion(base, mels, references)
        return Generated(images=blend(base, alpha, motion), alpha=alpha)

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


class PatchDiscriminator(nn.Module):
    """LSGAN patch discriminator: images [B, 3, S, S] in [0, 1] -> realness scores [B, 1, S/16, S/16].

    Unnormalised scores; LSGAN pushes real towards 1 and generated towards 0. Used only in training.
    """

    def __init__(self, widths=DISC_WIDTHS):
        super().__init__()
        layers, in_channels = [], 3
        for index, width in enumerate(widths):
            layers.append(nn.Conv2d(in_channels, width, 4, 2, 1))
            if index:  # no norm on the first layer, as in pix2pix
                layers.append(nn.InstanceNorm2d(width, affine=True))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            in_channels = width
        layers.append(nn.Conv2d(in_channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Centre on 0 so the first layer sees zero-mean input.
        return self.net(images * 2 - 1)
