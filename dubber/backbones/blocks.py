"""Layers shared by the backbones: conv-norm-act, residual blocks, the dynamic 1x1 convolution
(DCK, Ye et al.), an audio encoder over mel windows and MIA's MFCC encoder.

Shapes follow PyTorch: images [B, C, H, W]; mel windows [B, 1, 80, W] (80 mel bands, W mel frames
at 80 frames per second, see dubber.audio).
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dubber.audio import MEL_WINDOW, N_MELS

LEAKY_SLOPE = 0.2  # LeakyReLU slope everywhere; the DCK paper's Lemma 1 covers Leaky ReLU

# Audio encoder: Wav2Lip's layout (strides that take 80x16 mel frames down to 1x1), narrower.
AUDIO_WIDTHS = (16, 32, 64, 128)
AUDIO_STRIDES = ((1, 1), (3, 1), (3, 3), (3, 2))
AUDIO_EMBED_DIM = 256
MFCC_COEFFICIENTS = 13  # MIA's 20 x 13 MFCC input; here the mel window's frames x 13
MFCC_CNN_WIDTHS = ((32, 64, 64), (32, 64, 64, 64))  # MIA's 3-layer and 4-layer CNNs

# Dynamic 1x1 conv: the kernel generator's last layer starts scaled down so that at
# initialisation the audio-dependent part of the kernel is about as large as the static part
# (its bias) instead of ten times larger; training then decides how much audio matters.
DYNAMIC_INIT_SCALE = 0.1


class ConvNormAct(nn.Sequential):
    """Conv2d (same padding) -> BatchNorm2d -> LeakyReLU.  [B, in, H, W] -> [B, out, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1,
                 act: bool = True):
        super().__init__(
            # No conv bias: BatchNorm's shift makes it redundant.
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act else nn.Identity(),
        )


class ResidualBlock(nn.Module):
    """x + conv-bn-act-conv-bn(x), then LeakyReLU.  [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvNormAct(channels, channels), ConvNormAct(channels, channels, act=False))
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class UpConv(nn.Sequential):
    """Transposed conv (kernel 4, stride 2) -> BatchNorm2d -> LeakyReLU.  [B, in, H, W] -> [B, out, 2H, 2W].

    Kernel 4 with stride 2 gives every output pixel the same number of taps (no built-in
    checkerboard), and on a CPU it runs about twice as fast as nearest upsampling + 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )


def dynamic_conv1x1(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """1x1 convolution with a different kernel per sample, in one grouped-conv call.

    x [B, C_in, H, W]; kernels [B, C_out, C_in + 1] (last column: bias) -> [B, C_out, H, W].
    The batch is folded into channels and each sample is its own group, as in the DCK paper.
    """
    batch, in_channels, height, width = x.shape
    if kernels.shape[0] != batch or kernels.shape[2] != in_channels + 1:
        raise ValueError(f"kernels {tuple(kernels.shape)} do not fit input {tuple(x.shape)}")
    out_channels = kernels.shape[1]
    weight = kernels[:, :, :in_channels].reshape(batch * out_channels, in_channels, 1, 1)
    bias = kernels[:, :, in_channels].reshape(batch * out_channels)
    out = F.conv2d(x.reshape(1, batch * in_channels, height, width), weight, bias, groups=batch)
    return out.view(batch, out_channels, height, width)


class DynamicConv1x1(nn.Module):
    """A 1x1 conv whose kernel and bias are inferred from a condition vector (the audio embedding).

    A two-layer fully connected network maps cond [B, cond_dim] to kernels [B, C_out, C_in + 1];
    forward(x [B, C_in, H, W], cond [B, cond_dim]) -> [B, C_out, H, W].
    The last layer's bias is the static part of the kernel and is initialised like a conv kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, hidden_dim: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_net = nn.Sequential(
            nn.Linear(cond_dim, hidden_dim),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Linear(hidden_dim, out_channels * (in_channels + 1)),
        )
        last = self.kernel_net[-1]
        with torch.no_grad():
            last.weight.mul_(DYNAMIC_INIT_SCALE)
            bound = 1.0 / math.sqrt(in_channels)  # nn.Conv2d's default range for a 1x1 kernel
            last.bias.view(out_channels, in_channels + 1).uniform_(-bound, bound)

    def kernels(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, cond_dim] -> kernels [B, C_out, C_in + 1]."""
        return self.kernel_net(cond).view(-1, self.out_channels, self.in_channels + 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return dynamic_conv1x1(x, self.kernels(cond))


class AudioEncoder(nn.Module):
    """Mel window [B, 1, 80, 16] (values in [-4, 4]) -> audio embedding [B, embed_dim].

    Conv and residual blocks in Wav2Lip's layout (which the DCK paper uses pre-trained); here it is
    narrower and trained from scratch with the generator.
    """

    def __init__(self, embed_dim: int = AUDIO_EMBED_DIM, widths=AUDIO_WIDTHS, strides=AUDIO_STRIDES):
        super().__init__()
        layers, in_channels = [], 1
        for width, stride in zip(widths, strides):
            layers += [ConvNormAct(in_channels, width, 3, stride), ResidualBlock(width)]
            in_channels = width
        # 3x3 valid conv collapses the last 3x3 map (80x16 input) to 1x1, then a 1x1 projection.
        layers += [nn.Conv2d(in_channels, embed_dim, 3), nn.BatchNorm2d(embed_dim), nn.LeakyReLU(LEAKY_SLOPE, True),
                   nn.Conv2d(embed_dim, embed_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.embed_dim = embed_dim

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        if mels.dim() != 4 or mels.shape[1] != 1 or mels.shape[2] != N_MELS:
            raise ValueError(f"mel windows must be [B, 1, {N_MELS}, W], got {tuple(mels.shape)}")
        out = self.net(mels)
        # Pooling keeps windows other than 16 frames usable; at 16 the map is already 1x1.
        return out.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------
# space-time (3D) layers: clips [B, C, T, H, W] (Glance's decoder and its critics)


class ConvNormAct3d(nn.Sequential):
    """Conv3d (same padding) -> BatchNorm3d -> LeakyReLU.  [B, in, T, H, W] -> [B, out, T/st, H/s, W/s]
    for stride (st, s, s); kernel and stride are ints or (t, h, w) triples."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, act: bool = True):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride, tuple(k // 2 for k in kernel), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act else nn.Identity(),
        )


class ResidualBlock3d(nn.Module):
    """x + conv-bn-act-conv-bn(x) in space-time, then LeakyReLU.  [B, C, T, H, W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvNormAct3d(channels, channels), ConvNormAct3d(channels, channels, act=False))
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class UpConv3d(nn.Sequential):
    """3D deconvolution doubling height and width, keeping time: kernel (3, 4, 4), stride (1, 2, 2)
    -> BatchNorm3d -> LeakyReLU.  [B, in, T, H, W] -> [B, out, T, 2H, 2W] (UpConv's kernel 4 /
    stride 2 in space, for the same reason; a 3-frame kernel in time)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, (3, 4, 4), (1, 2, 2), (1, 1, 1), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )


def dct_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Orthonormal DCT-II [n_out, n_in]: MFCC = this @ log-mel (along the mel bands)."""
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    n = torch.arange(n_in, dtype=torch.float64)[None]
    basis = torch.cos(math.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


class MFCCEncoder(nn.Module):
    """Log-mel windows [N, 1, 80, W] -> MFCC [N, 1, 13, W] -> two parallel CNNs (their outputs
    flattened and concatenated) -> a linear classifier -> [N, out_dim] (MIA/AMIE's audio encoder)."""

    def __init__(self, widths: Sequence[Sequence[int]] = MFCC_CNN_WIDTHS, out_dim: int = AUDIO_EMBED_DIM,
                 coefficients: int = MFCC_COEFFICIENTS, mel_width: int = MEL_WINDOW):
        super().__init__()
        self.register_buffer("dct", dct_matrix(coefficients, N_MELS), persistent=False)
        self.branches = nn.ModuleList()
        flat = 0
        for branch in widths:
            layers, channels, shape = [], 1, [coefficients, mel_width]
            for index, width in enumerate(branch):
                stride = 2 if index in (1, 2) else 1  # two halvings per branch; the branches differ in depth
                layers.append(ConvNormAct(channels, width, 3, stride=stride))
                channels = width
                shape = [-(-s // stride) for s in shape]
            self.branches.append(nn.Sequential(*layers))
            flat += channels * shape[0] * shape[1]
        self.classifier = nn.Linear(flat, out_dim)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        mfcc = torch.einsum("km,nmw->nkw", self.dct, mels[:, 0].float())[:, None]
        return self.classifier(torch.cat([branch(mfcc).flatten(1) for branch in self.branches], 1))
