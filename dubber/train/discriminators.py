"""Critics used only in training (never shipped): the LSGAN patch discriminator."""

import torch
from torch import nn

from dubber.backbones.blocks import LEAKY_SLOPE

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
