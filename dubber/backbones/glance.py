"""Glance: lip movements generation at a glance (Chen, Li, Maddox, Duan and Xu, ECCV 2018).

From speech and ONE lip image of the target person, 16 frames of 64x64 lips at once:

  audio encoder     each frame's log-mel window -> F features per channel, then convolutions over
                    (time, frequency) for a wide temporal receptive field: f_s [B, Ca, T, F];
  identity encoder  the lip image -> f_p [B, Cp, F, F] (H = W = F, the paper's choice);
  fusion            duplication and concatenation (the paper's Fig. 3): f_s repeated along height
                    [B, Ca, T, F, F], f_p repeated T times [B, Cp, T, F, F], concatenated along
                    channels into the space-time feature f_v;
  decoder           residual blocks and 3D deconvolutions (space x2 each, time kept) to the clip
                    [B, 3, T, 64, 64].

The frames being re-voiced are not an input (the paper's generator sees only audio and the identity
image): everything outside the lips comes from the face through the blend (dubber.blend).

Differences from the paper, all for a CPU-trainable model and the project's shared features:
- Audio: the project's log-mel features (dubber.audio: 16 kHz, 80 bands, 80 columns a second), one
  0.2 s window centred on each frame, instead of 128 bands of one 0.64 s spectrogram at 44.1 kHz:
  every model and the preprocess cache share these; 80 bands to 7.6 kHz resolve the formants the
  lips shape, and per-frame windows keep any frame rate in sync (25, 29.97, 30 fps).
- Widths are small (FEATURE_SIDE 8, AUDIO_CHANNELS 32, IDENTITY_WIDTHS up to 128, DECODER_WIDTHS
  64-32-16-8; a 1x1x1 fusion layer and a 1x3x3 output layer, the layers at full size being most of
  the cost): 1.3 M parameters, about 0.1 s a clip forward and backward on one CPU thread.
"""

from typing import Any, Optional, Sequence

import torch
from torch import nn

from dubber.audio import N_MELS
from dubber.backbones import register
from dubber.backbones.base import CONDITION_CLOSED_MOUTH, Backbone, Generated
from dubber.backbones.blocks import (LEAKY_SLOPE, ConvNormAct, ConvNormAct3d, ResidualBlock, ResidualBlock3d,
                                     UpConv3d)
from dubber.face.crops import CROP_LIPS, CropSpec

SIZE = 64  # lip crop side (the paper's 64x64)
WINDOW, OVERLAP = 16, 8  # frames per call and frames shared by consecutive windows (the paper's sliding window)
FEATURE_SIDE = 8  # F = H = W of the fused feature: the identity image is encoded 64 -> 8
AUDIO_WIDTHS = (16, 32)  # per-frame mel encoder: 80 bands -> 16 -> FEATURE_SIDE, time pooled
AUDIO_CHANNELS = 32  # Ca: channels of f_s
AUDIO_TIME_LAYERS = 2  # 3x3 convolutions over (frames, frequency): receptive field 5 frames
IDENTITY_WIDTHS = (32, 64, 128)  # after each stride-2 convolution of the lip image (64 -> 32 -> 16 -> 8): Cp = last
DECODER_WIDTHS = (64, 32, 16, 8)  # fused feature, then after each 3D deconvolution (8 -> 16 -> 32 -> 64)
RESIDUAL_BLOCKS = 2  # 3D residual blocks on the fused feature


class FrameAudioEncoder(nn.Module):
    """Mel windows [B, T, 1, 80, W] -> audio features f_s [B, Ca, T, F]: each window's bands are
    reduced to F by strided convolutions and its columns averaged, then 3x3 convolutions over
    (frame, frequency) relate neighbouring frames."""

    def __init__(self, channels: int = AUDIO_CHANNELS, side: int = FEATURE_SIDE, widths: Sequence[int] = AUDIO_WIDTHS,
                 time_layers: int = AUDIO_TIME_LAYERS):
        super().__init__()
        if N_MELS % (side * 2):
            raise ValueError(f"{N_MELS} mel bands do not reduce to {side} by a stride-2 layer")
        first = N_MELS // (side * 2)  # 80 -> 16 bands (stride 5), then -> 8 (stride 2)
        self.per_frame = nn.Sequential(
            ConvNormAct(1, widths[0], 3, stride=(first, 1)), ResidualBlock(widths[0]),
            ConvNormAct(widths[0], widths[1], 3, stride=(2, 2)), ResidualBlock(widths[1]),
            ConvNormAct(widths[1], channels, 3, stride=(1, 2)))
        self.over_time = nn.Sequential(*(ConvNormAct(channels, channels, 3) for _ in range(time_layers)))
        self.side = side

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        if mels.dim() != 5 or mels.shape[2:4] != (1, N_MELS):
            raise ValueError(f"mel windows must be [B, T, 1, {N_MELS}, W], got {tuple(mels.shape)}")
        batch, frames = mels.shape[:2]
        per_frame = self.per_frame(mels.flatten(0, 1)).mean(dim=3)  # [B*T, Ca, F]
        features = per_frame.view(batch, frames, -1, self.side).permute(0, 2, 1, 3)  # [B, Ca, T, F]
        return self.over_time(features)


def fuse(audio: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Duplication and concatenation: f_s [B, Ca, T, F], f_p [B, Cp, F, F] -> f_v [B, Ca + Cp, T, F, F].

    Each frame's audio feature is repeated along height (T x F -> T x F x F); the image feature, a
    template of the clip, is repeated T times (F x F -> T x F x F)."""
    batch, _, frames, side = audio.shape
    if identity.shape[-2:] != (side, side):
        raise ValueError(f"identity feature must be {side}x{side}, got {tuple(identity.shape[-2:])}")
    audio = audio[:, :, :, None, :].expand(-1, -1, -1, side, -1)
    identity = identity[:, :, None].expand(-1, -1, frames, -1, -1)
    return torch.cat([audio, identity], dim=1)


@register
class Glance(Backbone):
    """forward(faces [B,T,3,64,64] (not used), mels [B,T,1,80,W], identity [B,3,64,64])
    -> Generated(images [B,T,3,64,64] RGB in [0, 1]). T is WINDOW for the runner; any T >= 1 works.

    audio_features(mels) -> f_s [B, Ca, T, F], the features the correlation loss differentiates
    (dubber.train.recipes.glance). Every width is a constructor argument.
    """

    name = "glance"
    crop = CropSpec(CROP_LIPS, SIZE)
    window, overlap = WINDOW, OVERLAP
    conditioning = CONDITION_CLOSED_MOUTH

    def __init__(self, side: int = FEATURE_SIDE, audio_channels: int = AUDIO_CHANNELS,
                 identity_widths: Sequence[int] = IDENTITY_WIDTHS, decoder_widths: Sequence[int] = DECODER_WIDTHS,
                 residual_blocks: int = RESIDUAL_BLOCKS):
        super().__init__()
        identity_widths, decoder_widths = tuple(identity_widths), tuple(decoder_widths)
        if side * 2 ** len(identity_widths) != SIZE or side * 2 ** (len(decoder_widths) - 1) != SIZE:
            raise ValueError(f"{len(identity_widths)} down- and {len(decoder_widths) - 1} up-sampling layers "
                             f"do not take {SIZE} px to {side} and back")
        self.audio_encoder = FrameAudioEncoder(audio_channels, side)
        layers, in_channels = [], 3
        for width in identity_widths:
            layers.append(ConvNormAct(in_channels, width, 3, stride=2))
            in_channels = width
        self.identity_encoder = nn.Sequential(*layers, ResidualBlock(in_channels))
        self.fusion = ConvNormAct3d(audio_channels + in_channels, decoder_widths[0], 1)  # mixes the channels
        self.residual = nn.Sequential(*(ResidualBlock3d(decoder_widths[0]) for _ in range(residual_blocks)))
        self.up = nn.Sequential(*(UpConv3d(a, b) for a, b in zip(decoder_widths, decoder_widths[1:])))
        # Plain output layer (no norm), sigmoid to [0, 1]; per frame: the deconvolutions already mix time.
        self.head = nn.Conv3d(decoder_widths[-1], 3, (1, 3, 3), padding=(0, 1, 1))
        for module in self.modules():  # He initialisation (the paper's [15]) for the LeakyReLU layers
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")

    def audio_features(self, mels: torch.Tensor) -> torch.Tensor:
        """mels [B, T, 1, 80, W] -> f_s [B, Ca, T, F]."""
        return self.audio_encoder(mels)

    def generate(self, audio: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """f_s [B, Ca, T, F] and lip images [B, 3, 64, 64] in [0, 1] -> clips [B, T, 3, 64, 64] in [0, 1]."""
        fused = fuse(audio, self.identity_encoder(identity * 2 - 1))
        clip = torch.sigmoid(self.head(self.up(self.residual(self.fusion(fused)))))  # [B, 3, T, S, S]
        return clip.transpose(1, 2)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        if identity is None:
            raise ValueError("Glance needs an identity lip image")
        if identity.dim() != 4 or identity.shape[1:] != (3, SIZE, SIZE):
            raise ValueError(f"identity must be [B, 3, {SIZE}, {SIZE}], got {tuple(identity.shape)}")
        if mels.shape[0] != identity.shape[0]:
            raise ValueError(f"mels and identity disagree on the batch: {mels.shape[0]} and {identity.shape[0]}")
        return Generated(images=self.generate(self.audio_features(mels), identity))
