"""CRAN: a conditional recurrent generator (Song et al., "Talking Face Generation by Conditional
Recurrent Adversarial Network", ../shared/papers).

Per frame t, an audio encoder E_A turns the MFCC of a 350 ms window (the paper's best; here
MEL_WIDTH log-mel frames through a fixed DCT, dubber.backbones.blocks.MFCCEncoder) into z_t^A; an
image encoder E_I turns the identity face into z^I once. The hybrid feature [z_t^A, z^I] enters a
recurrent unit (a GRU) running along the frames, so consecutive frames are generated from one
evolving state: the paper's answer to jittery, independent frames. Its output is drawn as a 4x4
map and a decoder with U-Net skips from E_I (the paper: low-level features keep an unseen face's
identity) produces the 128 x 128 face.

At inference the identity face is one frame per video, chosen by the conditioning strategy (a
photo's only frame), never the frame being dubbed. The GRU state is carried from window to window
by the runner (stateful) and reset at every gap in the face track.

forward(faces [B, T, 3, S, S] (unused), mels [B, T, 1, 80, MEL_WIDTH], identity [B, 3, S, S],
state: GRU hidden [1, B, HIDDEN] or None) -> Generated(images [B, T, 3, S, S] RGB in [0, 1], state).
"""

from typing import Any, Optional, Sequence

import torch
from torch import nn

from dubber.audio import MEL_FPS
from dubber.backbones import register
from dubber.backbones.base import CONDITION_CLOSED_MOUTH, Backbone, Generated
from dubber.backbones.blocks import LEAKY_SLOPE, MFCC_CNN_WIDTHS, ConvNormAct, MFCCEncoder, UpConv
from dubber.face.crops import CROP_BOX, CropSpec

SIZE = 128  # the paper's face size
AUDIO_SECONDS = 0.35  # the paper's best MFCC window
MEL_WIDTH = int(round(AUDIO_SECONDS * MEL_FPS))  # 28 log-mel frames
ENCODER_WIDTHS = (16, 32, 64, 128, 128, 128)  # E_I: stem at S, then after each stride-2 layer (S/32 = 4 px)
FEATURE_DIM = 256  # z^A and z^I
HIDDEN = 512  # the recurrent unit's state
MAP_CHANNELS = 64  # its output drawn as a 4 x 4 map of this many channels beside E_I's bottleneck
WINDOW = 8  # frames per call; the state carries across calls


@register
class CRAN(Backbone):
    """The generator of CRAN -- see the module docstring."""

    name = "cran"
    crop = CropSpec(CROP_BOX, SIZE)
    mel_width = MEL_WIDTH
    window = WINDOW
    overlap = 0
    stateful = True
    conditioning = CONDITION_CLOSED_MOUTH

    def __init__(self, size: int = SIZE, encoder_widths: Sequence[int] = ENCODER_WIDTHS,
                 audio_widths: Sequence[Sequence[int]] = MFCC_CNN_WIDTHS, feature_dim: int = FEATURE_DIM,
                 hidden: int = HIDDEN, map_channels: int = MAP_CHANNELS):
        super().__init__()
        widths, n_down = tuple(encoder_widths), len(encoder_widths) - 1
        if size % 2 ** n_down:
            raise ValueError(f"cran crop size must be divisible by {2 ** n_down}, got {size}")
        self.crop = CropSpec(CROP_BOX, size)
        self.bottom = size // 2 ** n_down
        self.stem = ConvNormAct(3, widths[0], 3)
        self.down = nn.ModuleList(ConvNormAct(widths[d - 1], widths[d], 3, stride=2) for d in range(1, n_down + 1))
        self.identity_code = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * self.bottom ** 2, feature_dim),
                                           nn.LeakyReLU(LEAKY_SLOPE, True))
        self.audio = MFCCEncoder([list(b) for b in audio_widths], feature_dim, mel_width=MEL_WIDTH)
        self.recurrent = nn.GRU(2 * feature_dim, hidden, batch_first=True)
        self.to_map = nn.Sequential(nn.Linear(hidden, map_channels * self.bottom ** 2), nn.LeakyReLU(LEAKY_SLOPE, True))
        self.map_channels = map_channels
        self.up = nn.ModuleList()
        channels = widths[-1] + map_channels
        for depth in range(n_down, 0, -1):
            self.up.append(UpConv(channels, widths[depth - 1]))
            channels = 2 * widths[depth - 1]
        self.head = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, faces: Optional[torch.Tensor], mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        if identity is None:
            raise ValueError("cran needs an identity face")
        batch, frames = mels.shape[:2]
        skips = [self.stem(identity * 2 - 1)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        audio = self.audio(mels.flatten(0, 1)).view(batch, frames, -1)
        code = self.identity_code(skips[-1])[:, None].expand(-1, frames, -1)
        hidden, state = self.recurrent(torch.cat([audio, code], 2), state)
        maps = self.to_map(hidden.flatten(0, 1)).view(-1, self.map_channels, self.bottom, self.bottom)
        repeat = (lambda x: x[:, None].expand(-1, frames, *x.shape[1:]).flatten(0, 1))
        x = torch.cat([maps, repeat(skips[-1])], 1)
        for index, layer in enumerate(self.up):
            x = torch.cat([layer(x), repeat(skips[len(skips) - 2 - index])], 1)
        images = torch.sigmoid(self.head(x)).view(batch, frames, 3, *x.shape[-2:])
        return Generated(images=images, state=state.detach())
