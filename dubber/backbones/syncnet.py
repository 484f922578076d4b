"""The lip-sync expert, a SyncNet as Wav2Lip's: 5 mouth crops and 0.2 s of audio -> two embeddings
whose distance is small when the audio is the one those lips are saying at that moment.

Evaluation scores sync with it (dubber.eval.sync: LSE-D, LSE-C, AV offset); generator recipes use
its P(in sync) as a loss. Trained by dubber.train.recipes.syncnet.

Inputs: mouth windows [B, 15, 48, 96] float in [0, 1] -- MOUTH_FRAMES consecutive RGB mouth crops
stacked frame-major as channels (frame 0 RGB, frame 1 RGB, ...); a mouth crop is the lower half of a
96x96 aligned face (see mouths_from_faces). Mel windows [B, 1, 80, 16] from
dubber.audio.mel_windows(..., width=MEL_WINDOW): 0.2 s centred on the middle (third) frame of the five.
"""

from typing import Iterable, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dubber.audio import MEL_WINDOW, N_MELS
from dubber.backbones import register
from dubber.backbones.blocks import LEAKY_SLOPE, AudioEncoder, ConvNormAct, ResidualBlock
from dubber.checkpoint import SelfDescribing
from dubber.face.crops import CROP_FACE, CropSpec

MOUTH_FRAMES = 5
MOUTH_H, MOUTH_W = 48, 96
FACE_CROP = CropSpec(CROP_FACE, 96)  # the aligned face whose lower half is the mouth crop
FACE_SIZE = FACE_CROP.size

# Audio offsets the expert is asked to choose among, video frames either way: evaluation searches
# them (syncnet_python's vshift = 15) and training shows them as hard negatives.
OFFSET_RANGE = 15

BASE_CHANNELS = 32
EMBED_DIM = 256

# Face stages: (width multiple of base_channels, stride, residual block after it). The first
# stride halves only the width, making the 48x96 crop square; four more reach 3x3.
FACE_STAGES = ((1, (1, 2), False), (2, 2, True), (4, 2, True), (8, 2, True), (8, 2, False))


@register
class SyncNet(SelfDescribing):
    """Face and audio encoders -> L2-normalised embeddings [B, embed_dim] (embed_face, embed_audio).

    forward(mouth_windows [B, 15, 48, 96], mels [B, 1, 80, 16]) -> P(in sync) [B] in [0, 1], the
    score a generator's sync loss takes -log of.
    Unlike Wav2Lip there is no ReLU before normalisation, so cosine similarity spans [-1, 1] and
    P = (1 + cos) / 2: with the ReLU, the synthetic sync task of tests/test_syncnet.py reached
    0.5-0.8 offset accuracy in 60 steps instead of 0.9-1.0.
    """

    name = "syncnet"
    role = "sync expert"  # what `dubber backbones` calls it

    def __init__(self, base_channels: int = BASE_CHANNELS, embed_dim: int = EMBED_DIM):
        super().__init__()

        layers, in_channels = [], 3 * MOUTH_FRAMES
        for multiple, stride, residual in FACE_STAGES:
            width = base_channels * multiple
            layers.append(ConvNormAct(in_channels, width, 3, stride))
            if residual:
                layers.append(ResidualBlock(width))
            in_channels = width
        layers += [nn.Conv2d(in_channels, embed_dim, 3), nn.BatchNorm2d(embed_dim), nn.LeakyReLU(LEAKY_SLOPE, True),
                   nn.Conv2d(embed_dim, embed_dim, 1)]
        self.face_encoder = nn.Sequential(*layers)
        # Wav2Lip's audio layout, scaled with the face encoder (base 32 -> widths 16, 32, 64, 128).
        audio_widths = tuple(max(1, base_channels * m // 2) for m in (1, 2, 4, 8))
        self.audio_encoder = AudioEncoder(embed_dim, widths=audio_widths)

    def embed_face(self, mouth_windows: torch.Tensor) -> torch.Tensor:
        """[B, 15, 48, 96] in [0, 1] -> [B, embed_dim], unit norm."""
        expected = (3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W)
        if mouth_windows.dim() != 4 or tuple(mouth_windows.shape[1:]) != expected:
            raise ValueError(f"mouth windows must be [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(mouth_windows.shape)}")
        # Centred pixels make the convolutions' zero padding read as mid-grey, not as a dark frame.
        out = self.face_encoder(mouth_windows - 0.5).mean(dim=(2, 3))
        return F.normalize(out, dim=1)

    def embed_audio(self, mels: torch.Tensor) -> torch.Tensor:
        """[B, 1, 80, 16] log-mel in [-4, 4] -> [B, embed_dim], unit norm."""
        return F.normalize(self.audio_encoder(mels), dim=1)

    def forward(self, mouth_windows: torch.Tensor, mels: torch.Tensor) -> torch.Tensor:
        return sync_probability(self.embed_face(mouth_windows), self.embed_audio(mels))


def sync_probability(face_emb: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] unit norm -> [B] in [0, 1]: (1 + cosine) / 2, the expert's "in sync" score."""
    return (1 + F.cosine_similarity(face_emb, audio_emb, dim=1)) / 2


def mouths_from_faces(faces: np.ndarray) -> np.ndarray:
    """Aligned face crops uint8 [T, S, S, 3] RGB -> mouth crops uint8 [T, 48, 96, 3]: the lower half
    of the face resized to 96x96 (area filter when shrinking)."""
    faces = np.asarray(faces)
    if faces.ndim != 4 or faces.shape[1] != faces.shape[2] or faces.shape[3] != 3:
        raise ValueError(f"faces must be square RGB crops [T, S, S, 3], got {faces.shape}")
    if faces.shape[1] != FACE_SIZE:
        interpolation = cv2.INTER_AREA if faces.shape[1] > FACE_SIZE else cv2.INTER_LINEAR
        faces = np.stack([cv2.resize(face, (FACE_SIZE, FACE_SIZE), interpolation=interpolation) for face in faces])
    return np.ascontiguousarray(faces[:, FACE_SIZE - MOUTH_H:])


def mouth_tensor(mouths: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """[T, 3, 48, 96] float in [0, 1], or uint8 [T, 48, 96, 3] as stored -> float tensor [T, 3, 48, 96]."""
    mouths = torch.as_tensor(np.asarray(mouths) if not isinstance(mouths, torch.Tensor) else mouths)
    if mouths.dtype == torch.uint8 and mouths.dim() == 4 and mouths.shape[-1] == 3:
        mouths = mouths.permute(0, 3, 1, 2).float() / 255.0
    if mouths.dim() != 4 or tuple(mouths.shape[1:]) != (3, MOUTH_H, MOUTH_W):
        raise ValueError(f"mouths must be [T, 3, {MOUTH_H}, {MOUTH_W}] in [0, 1], got {tuple(mouths.shape)}")
    return mouths.float()


def mel_tensor(mels: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """[T, 1, 80, 16] or [T, 80, 16] -> float tensor [T, 1, 80, 16]."""
    mels = torch.as_tensor(np.asarray(mels) if not isinstance(mels, torch.Tensor) else mels).float()
    if mels.dim() == 3:
        mels = mels[:, None]
    if mels.dim() != 4 or tuple(mels.shape[1:]) != (1, N_MELS, MEL_WINDOW):
        raise ValueError(f"mels must be [T, 1, {N_MELS}, {MEL_WINDOW}], got {tuple(mels.shape)}")
    return mels


def window_tensor(windows: np.ndarray) -> torch.Tensor:
    """Mouth windows uint8 [B, 5, 48, 96, 3] as stored -> float [B, 5, 3, 48, 96] in [0, 1]."""
    windows = np.asarray(windows)
    return mouth_tensor(windows.reshape(-1, *windows.shape[2:])).view(windows.shape[0], MOUTH_FRAMES, 3, MOUTH_H, MOUTH_W)


def stack_windows(mouths: torch.Tensor, starts: Iterable[int]) -> torch.Tensor:
    """mouths [T, 3, 48, 96] -> mouth windows [len(starts), 15, 48, 96]: frames s..s+4, frame-major."""
    return torch.stack([mouths[s:s + MOUTH_FRAMES].reshape(3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W) for s in starts])
