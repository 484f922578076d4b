"""Critics used only in training (never shipped): the LSGAN patch discriminator (DCK, and CRAN's
image discriminator), Glance's three-stream discriminator, CRAN's video discriminator and
MIA/AMIE's critics of (frame, audio) pairs."""

from typing import Optional

import torch
from torch import nn

from dubber.audio import N_MELS
from dubber.backbones.blocks import LEAKY_SLOPE, MFCCEncoder


def critic_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of a critic's logits against one label (real: 1, else 0)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


PATCH_WIDTHS = (32, 64, 128, 256)


class PatchDiscriminator(nn.Module):
    """Images [B, 3, S, S] in [0, 1] -> realness scores [B, 1, S/16, S/16] (unnormalised; LSGAN
    pushes real towards 1 and generated towards 0)."""

    def __init__(self, widths=PATCH_WIDTHS):
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


# Glance's three-stream discriminator (Chen et al. 2018, Sec. 4.2 and Fig. 5).
STREAM_WIDTHS = (16, 32, 64, 64)  # each stream's four layers (the paper: four layers per stream)
STREAM_GRID = (4, 4, 4)  # (time, height, width) every stream is pooled to before the streams meet
AUDIO_COLUMNS = 4  # mel columns kept around each frame's centre: 4 per frame ~ 3.2 at 25 fps, contiguous
HEAD_WIDTH = 64


def _stream3d(in_channels: int, widths=STREAM_WIDTHS) -> nn.Sequential:
    """Four Conv3d layers (stride 2 in space, in time from the second) with LeakyReLU."""
    layers = []
    for index, width in enumerate(widths):
        layers += [nn.Conv3d(in_channels, width, 3, (1 if index == 0 else 2, 2, 2), 1), nn.LeakyReLU(LEAKY_SLOPE, True)]
        in_channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(STREAM_GRID))


class ThreeStreamDiscriminator(nn.Module):
    """(mels [B, T, 1, 80, W], clips [B, T, 3, S, S] in [0, 1], flow [B, 2, T-1, s, s] or None)
    -> logits [B] that the clip is real and speaks this audio.

    Audio stream: the clip's log-mel columns (AUDIO_COLUMNS around each frame's centre, side by
    side) through four convolutions and a fully connected layer to one vector, duplicated over
    the grid; video stream: four 3D convolutions; optical-flow stream (with `flow_stream`): four
    3D convolutions over the clip's flow (dubber.train.flow). Concatenated along channels, two
    convolutions give the logit. Without the flow stream it is the paper's two-stream ablation.
    """

    def __init__(self, flow_stream: bool = True, widths=STREAM_WIDTHS):
        super().__init__()
        self.flow_stream = flow_stream
        layers, in_channels = [], 1
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, 2, 1), nn.LeakyReLU(LEAKY_SLOPE, True)]
            in_channels = width
        self.audio = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, widths[-1]))
        self.video = _stream3d(3, widths)
        self.flow = _stream3d(2, widths) if flow_stream else None
        streams = (3 if flow_stream else 2) * widths[-1]
        self.head = nn.Sequential(nn.Conv3d(streams, HEAD_WIDTH, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE, True),
                                  nn.Conv3d(HEAD_WIDTH, 1, STREAM_GRID))

    def forward(self, mels: torch.Tensor, clips: torch.Tensor, flow: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, frames = clips.shape[:2]
        width = mels.shape[-1]
        columns = mels[:, :, 0, :, width // 2 - AUDIO_COLUMNS // 2: width // 2 + AUDIO_COLUMNS // 2]
        spectrogram = columns.permute(0, 2, 1, 3).reshape(batch, 1, N_MELS, frames * AUDIO_COLUMNS)
        audio = self.audio(spectrogram)[:, :, None, None, None].expand(-1, -1, *STREAM_GRID)
        streams = [audio, self.video(clips.transpose(1, 2) * 2 - 1)]
        if self.flow_stream:
            if flow is None:
                raise ValueError("the three-stream discriminator needs the clip's flow")
            streams.append(self.flow(flow))
        return self.head(torch.cat(streams, dim=1)).view(batch)


class VideoDiscriminator(nn.Module):
    """CRAN's D_V: clips [B, T, 3, S, S] in [0, 1] -> logits [B] that the clip is real: four 3D
    convolutions (the video stream of the three-stream discriminator) and one over their grid."""

    def __init__(self, widths=STREAM_WIDTHS):
        super().__init__()
        self.video = _stream3d(3, widths)
        self.head = nn.Conv3d(widths[-1], 1, STREAM_GRID)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.video(clips.transpose(1, 2) * 2 - 1)).view(len(clips))


# MIA/AMIE's frame discriminator and mutual-information network: both score (frame, audio) pairs.
PAIR_WIDTHS = (32, 64, 128, 128)  # stride-2 convolutions over the frame (128 px -> 8 px), then pooled to PAIR_GRID
PAIR_GRID = 4
PAIR_AUDIO_WIDTHS = ((16, 32, 32), (16, 32, 32, 32))  # the audio's two parallel CNNs (as the generator's, narrower)
PAIR_HIDDEN = 256


class PairCritic(nn.Module):
    """(frames [N, 3, S, S] in [0, 1], mels [N, 1, 80, W]) -> scores [N] (unnormalised). MIA/AMIE use
    it twice: as the frame discriminator (real frame with its own audio, or not?) and as the
    mutual-information network T(frame, audio)."""

    def __init__(self, widths=PAIR_WIDTHS, audio_widths=PAIR_AUDIO_WIDTHS, hidden: int = PAIR_HIDDEN):
        super().__init__()
        layers, channels = [], 3
        for index, width in enumerate(widths):
            layers.append(nn.Conv2d(channels, width, 4, 2, 1))
            if index:
                layers.append(nn.InstanceNorm2d(width, affine=True))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            channels = width
        self.frame = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(PAIR_GRID), nn.Flatten())
        self.audio = MFCCEncoder([list(w) for w in audio_widths], hidden)
        self.head = nn.Sequential(nn.Linear(channels * PAIR_GRID ** 2 + hidden, hidden),
                                  nn.LeakyReLU(LEAKY_SLOPE, inplace=True), nn.Linear(hidden, 1))

    def forward(self, frames: torch.Tensor, mels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.frame(frames * 2 - 1), self.audio(mels)], 1))[:, 0]
