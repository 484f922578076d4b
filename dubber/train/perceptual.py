"""The perceptual network of the recipes that need one, trained here (no pretrained network can be
downloaded): an autoencoder of real crops whose encoder gives the features the perceptual loss
compares. Glance's paper trains one on lip frames (its Sec. 4.1: stride-2 convolutions and six
residual blocks); MIA/AMIE use the same kind on faces in place of the papers' pretrained VGG.

A recipe trains it on the real frames of its first steps, beside the generator, then freezes it.
"""

from typing import Sequence

import torch
from torch import nn

from dubber.backbones.blocks import ConvNormAct, ResidualBlock, UpConv

AE_WIDTHS = (16, 32, 32)  # stride-2 convolutions (a 64 px crop -> 8 px); then AE_RESIDUALS blocks
AE_RESIDUALS = 6  # Glance paper, Sec. 4.1


class Autoencoder(nn.Module):
    """Frames [N, 3, S, S] in [0, 1] -> reconstructions; features(x) -> [N, widths[-1], S/8, S/8],
    the perceptual loss's phi."""

    def __init__(self, widths: Sequence[int] = AE_WIDTHS, residuals: int = AE_RESIDUALS):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers.append(ConvNormAct(channels, width, 3, stride=2))
            channels = width
        self.encoder = nn.Sequential(*layers, *(ResidualBlock(channels) for _ in range(residuals)))
        ups = []
        for width in tuple(reversed(widths))[1:] + (widths[0],):
            ups.append(UpConv(channels, width))
            channels = width
        self.decoder = nn.Sequential(*ups, nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(images))

    def train_on(self, frames: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One step of reconstructing real frames [N, 3, S, S] (L1) -> the loss."""
        loss = (self(frames) - frames).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def distance(self, generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Perceptual loss: mean squared distance of the features of generated and real frames."""
        with torch.no_grad():
            target = self.features(real)
        return (self.features(generated) - target).pow(2).mean()
