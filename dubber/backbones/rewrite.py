"""Rewrite: a two-stage backbone -- audio to mouth shape, then the person's own real mouths.

Stage 1 (this network) hears 0.5 s of speech round each frame and predicts the mouth at that
frame: its 20 landmarks (dlib 48-67) as a deviation from the person's mean mouth, in pixels of its
crop (a 256 px box aligned on eyes and nose), where the lips are in the crop -- the lower lip and
the mouth's centre drop as the jaw opens, which is most of what a still mouth gets wrong (on the
val_select clips, the exact centroid with a still shape is 1.91 px from the real points, the exact
shape with a still centroid 2.42, a still mouth 3.01). With centred=True it predicts each frame's
points about their centroid instead (the shape alone: the ablation, weights/README.md). Shapes are
identity-free enough to learn from every frame of every clip (IP_LAP, Zhong et al. 2023, learns
its landmarks the same way); pixels are not, on ~85 identities.

Stage 2 is not learnt: dubber.mouthbank retrieves, among the video's own frames, the real lower
face whose mouth shape is closest to the predicted one (staying on consecutive real frames where
it can), warps its mouth onto the predicted points (dubber.face.morph) and the pipeline pastes it
as it pastes any crop. The crop is 256 px, near the size of a face in 720p/1080p video, so the
pasted mouth is hardly resampled: real mouths keep their sharpness, teeth and lipstick (the
network never sees pixels, so the size costs it nothing). The video must show a range of mouth
shapes, so this backbone dubs videos, not photos (Video Rewrite, Bregler et al. 1997;
"Synthesizing Obama", Suwajanakorn et al. 2017).

forward(faces [B, T, 3, S, S] (unused), mels [B, T, 1, 80, MOTION_MEL_WIDTH]) ->
Generated(points=[B, T, 20, 2]): the deviation from the person's mean mouth, crop pixels.
"""

from typing import Any, Optional

import torch
from torch import nn

from dubber.audio import N_MELS
from dubber.backbones import register
from dubber.backbones.base import CONDITION_NONE, Backbone, Generated
from dubber.face.crops import CROP_BOX, CropSpec

# Gaussian smoothing of the predicted shapes along time (frames): on the val_select clips of 2 s and
# more, sigma 0 / 1 / 2 gave LMD 1.821 / 1.819 / 1.809 and opening r 0.495 / 0.504 / 0.528.
SMOOTH_SIGMA = 2.0
SMOOTH_RADIUS = 4
# L1 regression predicts the middle of the motions a sound allows, smaller than any of them: at
# inference the deviation is scaled up. On every val_select clip (dubber eval, the whole pipeline)
# gain 1 / 1.3 / 1.6 gave LMD 1.419 / 1.416 / 1.419, opening r 0.349 / 0.385 / 0.384, LSE-C0
# 0.026 / 0.030 / 0.035 (real clips 0.044); stage 1's val_lmd 2.818 / 2.807 (1.4) / 2.820.
MOTION_GAIN = 1.6
MOTION_MEL_WIDTH = 40  # mel frames heard per video frame: 0.5 s, centred (a phoneme's neighbours shape the lips)
MOUTH_POINTS = 20  # dlib 48-67
CHANNELS = 128  # width of the convolutions over the mel frames
HIDDEN = 256
TEMPORAL_KERNEL = 5  # frames each temporal layer sees (temporal > 0)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


@register
class Rewrite(Backbone):
    """Audio -> mouth shape (stage 1 of the two-stage backbone); ~0.4 M parameters."""

    name = "rewrite"
    crop = CropSpec(CROP_BOX, 256)  # the mouth bank's crops (and the unit of the predicted points)
    mel_width = MOTION_MEL_WIDTH
    conditioning = CONDITION_NONE
    returns_points = True
    window = 16  # frames per call: the predicted shapes are smoothed along time within a call
    overlap = 8

    def __init__(self, channels: int = CHANNELS, hidden: int = HIDDEN, dropout: float = 0.0, temporal: int = 0,
                 centred: bool = False, motion_gain: float = MOTION_GAIN):
        super().__init__()
        self.motion_gain = motion_gain
        self.points_centred = centred  # the shape about its centroid (False: where the lips are, too)
        self.encoder = nn.Sequential(
            _conv(N_MELS, channels, 1), _conv(channels, channels, 2), _conv(channels, channels, 2),
            _conv(channels, channels, 2), _conv(channels, channels, 1))
        steps = -(-MOTION_MEL_WIDTH // 8)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * steps, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, MOUTH_POINTS * 2))
        # temporal > 0: residual convolutions along the frames of a window between the per-frame
        # features and the output (the shape at t from the features round it)
        self.temporal = nn.ModuleList(
            nn.Sequential(nn.Conv1d(hidden, hidden, TEMPORAL_KERNEL, padding=TEMPORAL_KERNEL // 2), nn.ReLU(inplace=True))
            for _ in range(temporal))

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        batch, frames = mels.shape[:2]
        mel = mels.reshape(batch * frames, N_MELS, mels.shape[-1]).float()
        features = self.head[:4](self.encoder(mel))  # [B*T, hidden]
        if len(self.temporal):
            series = features.view(batch, frames, -1).transpose(1, 2)
            for layer in self.temporal:
                series = series + layer(series)
            features = series.transpose(1, 2).reshape(batch * frames, -1)
        points = self.head[4:](features).view(batch, frames, MOUTH_POINTS, 2)
        if frames > 1 and SMOOTH_SIGMA > 0:
            points = _smooth_time(points, SMOOTH_SIGMA)
        if not self.training:  # trained on the real motion; dubbing moves the mouth by motion_gain times it
            points = points * self.motion_gain
        return Generated(images=None, points=points)


def _smooth_time(points: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing along T of [B, T, P, 2] (edges replicated): shapes from neighbouring
    windows of speech differ by noise as much as by articulation."""
    offsets = torch.arange(-SMOOTH_RADIUS, SMOOTH_RADIUS + 1, dtype=points.dtype, device=points.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    batch, frames = points.shape[:2]
    series = points.reshape(batch, frames, -1).transpose(1, 2).reshape(-1, 1, frames)
    padded = torch.nn.functional.pad(series, (SMOOTH_RADIUS, SMOOTH_RADIUS), mode="replicate")
    smoothed = torch.nn.functional.conv1d(padded, kernel.view(1, 1, -1))
    return smoothed.view(batch, -1, frames).transpose(1, 2).reshape(points.shape)
