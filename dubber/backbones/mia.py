"""MIA and AMIE: a talking-face generator fed back its own previous frame (Zhu et al.,
"High-Resolution Talking Face Generation via Mutual Information Approximation" (MIA), and its
later form with the Asymmetric Mutual Information Estimator (AMIE); ../shared/papers).

Three inputs per frame (the papers' Fig. 2):
- the identity face I_f -> a U-Net encoder whose skips feed the frame decoder, the outermost two
  removed (papers, Sec. 3.1: "the outer skip connection gives more detail information", so the
  output would copy the input's mouth); at inference one frame per video chosen by the
  conditioning strategy (a photo's only frame), never the frame being dubbed;
- the audio -> MFCC (a fixed DCT of the log-mel window) and two parallel CNNs of 3 and 4 layers,
  flattened, concatenated and a one-layer classifier -> Z_a (256-d; dubber.backbones.blocks.MFCCEncoder);
- the previously generated frame, at PREVIOUS_SIZE -> a LightCNN-9 encoder with max-feature-map
  activations -> Z_p (256-d); the first frame of a run uses the identity face.
Z_f = [Z_a, Z_p] (512-d) becomes a 4x4 map beside the identity encoder's bottleneck and the
decoder draws the face. Xavier-normal initialisation (papers, Sec. 4).

The two names differ only in how they are trained (dubber.train.recipes.mia: the mutual-information
estimator and the attention mask); the shipped files record which.

Resolution: the papers work at 256 x 256 on GPUs; here 128 px box crops (the face and its
surroundings, as DCK), and LightCNN's widths halved (LIGHTCNN_WIDTHS), so a CPU trains it: the
structure is the papers'.

forward(faces [B, T, 3, S, S] (unused: the generator never sees the frames it replaces),
mels [B, T, 1, 80, W], identity [B, 3, S, S], state: previous frame [B, 3, S, S] or None)
-> Generated(images [B, T, 3, S, S] RGB in [0, 1], state: the last frame generated).
"""

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dubber.backbones import register
from dubber.backbones.base import CONDITION_CLOSED_MOUTH, Backbone, Generated
from dubber.backbones.blocks import LEAKY_SLOPE, MFCC_CNN_WIDTHS, ConvNormAct, MFCCEncoder, UpConv
from dubber.face.crops import CROP_BOX, CropSpec

SIZE = 128
IDENTITY_WIDTHS = (16, 32, 64, 128, 128, 128)  # stem at S, then after each stride-2 layer (S/32 = 4 px); DCK's widths
REMOVED_SKIPS = 2  # the outermost skips (full and half resolution) are not passed to the decoder (papers, Sec. 3.1)
FEATURE_DIM = 256  # Z_a and Z_p each (papers, Fig. 2)
LIGHTCNN_WIDTHS = (24, 48, 96, 64, 64)  # LightCNN-9's 48, 96, 192, 128, 128 halved (outputs of its MFM layers)
FUSED_CHANNELS = 64  # Z_f drawn as a 4 x 4 map of this many channels beside the identity bottleneck
PREVIOUS_SIZE = 64  # the previous frame is seen at this size: what it tells (the mouth's last state, the
# motion) is coarse, and LightCNN on 128 px frames was half the training step's time
WINDOW = 8  # frames per call: each is generated from the previous one, in turn


class MaxFeatureMap(nn.Module):
    """LightCNN's max-feature-map: a convolution to 2C channels, the element-wise max of its halves."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, kernel, stride, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return torch.max(a, b)


class LightCNN9(nn.Module):
    """LightCNN-9 (Wu et al. 2018): MFM 5x5, then four "group" blocks (1x1 MFM, 3x3 MFM), max-pooling
    between; a final MFM fully connected layer -> [B, out_dim]."""

    def __init__(self, widths: Sequence[int] = LIGHTCNN_WIDTHS, out_dim: int = FEATURE_DIM, size: int = SIZE):
        super().__init__()
        layers, channels = [MaxFeatureMap(3, widths[0], 5), nn.MaxPool2d(2)], widths[0]
        for index, width in enumerate(widths[1:]):
            layers += [MaxFeatureMap(channels, channels, 1), MaxFeatureMap(channels, width, 3)]
            if index != 2:  # LightCNN-9 pools after groups 1, 2 and 4
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        side = size // 16
        self.fc_a = nn.Linear(channels * side * side, out_dim)
        self.fc_b = nn.Linear(channels * side * side, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images * 2 - 1).flatten(1)
        return torch.max(self.fc_a(x), self.fc_b(x))


@register
class MIA(Backbone):
    """The generator of MIA (trained with the asymmetric estimator) -- see the module docstring."""

    name = "mia"
    crop = CropSpec(CROP_BOX, SIZE)
    window = WINDOW
    overlap = 0
    stateful = True
    conditioning = CONDITION_CLOSED_MOUTH

    def __init__(self, size: int = SIZE, identity_widths: Sequence[int] = IDENTITY_WIDTHS,
                 removed_skips: int = REMOVED_SKIPS, lightcnn_widths: Sequence[int] = LIGHTCNN_WIDTHS,
                 audio_widths: Sequence[Sequence[int]] = MFCC_CNN_WIDTHS, feature_dim: int = FEATURE_DIM,
                 fused_channels: int = FUSED_CHANNELS, previous_size: int = PREVIOUS_SIZE):
        super().__init__()
        widths, n_down = tuple(identity_widths), len(identity_widths) - 1
        if size % 2 ** n_down or previous_size % 16:  # LightCNN-9 halves its input four times
            raise ValueError(f"{self.name}: crop size must be divisible by {2 ** n_down} and previous_size by 16, "
                             f"got {size} and {previous_size}")
        self.crop = CropSpec(CROP_BOX, size)
        self.removed_skips = removed_skips
        self.bottom = size // 2 ** n_down
        self.stem = ConvNormAct(3, widths[0], 3)
        self.down = nn.ModuleList(ConvNormAct(widths[d - 1], widths[d], 3, stride=2) for d in range(1, n_down + 1))
        self.audio = MFCCEncoder([list(b) for b in audio_widths], feature_dim)
        self.previous_size = previous_size
        self.previous = LightCNN9(lightcnn_widths, feature_dim, self.previous_size)
        self.fuse = nn.Sequential(nn.Linear(2 * feature_dim, fused_channels * self.bottom ** 2),
                                  nn.LeakyReLU(LEAKY_SLOPE, True))
        self.fused_channels = fused_channels
        # Up-sampling at depth d takes the map at depth d to depth d-1, then concatenates the
        # identity encoder's skip at d-1 unless it is one of the removed outermost ones.
        self.up = nn.ModuleList()
        channels = widths[-1] + fused_channels
        for depth in range(n_down, 0, -1):
            self.up.append(UpConv(channels, widths[depth - 1]))
            channels = widths[depth - 1] + (widths[depth - 1] if depth - 1 >= removed_skips else 0)
        self.head = nn.Conv2d(channels, 3, 3, padding=1)
        for module in self.modules():  # papers, Sec. 4: Xavier normal
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode_identity(self, identity: torch.Tensor) -> list:
        """Identity faces [B, 3, S, S] in [0, 1] -> the encoder's maps, full resolution first."""
        maps = [self.stem(identity * 2 - 1)]
        for layer in self.down:
            maps.append(layer(maps[-1]))
        return maps

    def frame(self, skips: list, audio: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """One frame: identity maps, Z_a [B, 256], previous frame [B, 3, S, S] -> [B, 3, S, S] in [0, 1]."""
        small = F.interpolate(previous, size=self.previous_size, mode="area")
        fused = self.fuse(torch.cat([audio, self.previous(small)], 1))
        x = torch.cat([skips[-1], fused.view(-1, self.fused_channels, self.bottom, self.bottom)], 1)
        for index, layer in enumerate(self.up):
            depth = len(skips) - 2 - index  # the depth this layer reaches
            x = layer(x)
            if depth >= self.removed_skips:
                x = torch.cat([x, skips[depth]], 1)
        return torch.sigmoid(self.head(x))

    def forward(self, faces: Optional[torch.Tensor], mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None, attention: Optional[torch.Tensor] = None) -> Generated:
        """attention [B, 1, S, S] (training only: the papers' dynamic attention) multiplies the identity face."""
        if identity is None:
            raise ValueError(f"{self.name} needs an identity face")
        batch, frames = mels.shape[:2]
        source = identity if attention is None else identity * attention
        skips = self.encode_identity(source)
        audio = self.audio(mels.flatten(0, 1)).view(batch, frames, -1)
        previous = identity if state is None else state
        out = []
        for t in range(frames):
            previous = self.frame(skips, audio[:, t], previous)
            out.append(previous)
        return Generated(images=torch.stack(out, 1), state=previous.detach())


@register
class AMIE(MIA):
    """The same generator, trained with AMIE's refinements (dubber.train.recipes.mia)."""

    name = "amie"
