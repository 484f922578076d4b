"""A SyncNet-style lip-sync expert (as Wav2Lip's): 5 mouth crops and 0.2 s of audio -> two embeddings
whose distance is small when the audio is the one those lips are saying at that moment.

Used to score sync (LSE-D, LSE-C, AV offset; see dubber.eval.metrics.lse) and, through sync_loss,
as a sync penalty for training generators. Train it with dubber.train.syncnet.train_syncnet.

Inputs: mouth windows [B, 15, 48, 96] float in [0, 1] -- MOUTH_FRAMES consecutive RGB mouth crops
stacked frame-major as channels (frame 0 RGB, frame 1 RGB, ...); a mouth crop is the lower half of a
96x96 aligned face (see mouths_from_faces). Mel windows [B, 1, 80, 16] from
dubber.audio.mel_windows(..., width=16): 0.2 s centred on the middle (third) frame of the five.
"""

from typing import Dict, Iterable, Optional, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dubber.backbones.blocks import LEAKY_SLOPE, N_MELS, AudioEncoder, ConvNormAct, ResidualBlock
from dubber.eval.metrics import lse

MOUTH_FRAMES = 5
MOUTH_H, MOUTH_W = 48, 96
FACE_SIZE = 96  # side of the aligned face the mouth crop is the lower half of
MEL_WIDTH = 16  # mel frames per window (0.2 s at 80 frames/s)
OFFSETS = range(-15, 16)  # audio shifts searched at evaluation, video frames (syncnet_python's vshift=15)

BASE_CHANNELS = 32
EMBED_DIM = 256
CONTRASTIVE_TEMPERATURE = 0.2  # cosines in [-1, 1] -> logits in [-5, 5]; 0.1 learnt slower on a synthetic task
EVAL_BATCH = 128  # windows per forward pass in offset_distances

# Face stages: (width multiple of base_channels, stride, residual block after it). The first
# stride halves only the width, making the 48x96 crop square; four more reach 3x3.
FACE_STAGES = ((1, (1, 2), False), (2, 2, True), (4, 2, True), (8, 2, True), (8, 2, False))


class SyncNet(nn.Module):
    """Face and audio encoders -> L2-normalised embeddings [B, embed_dim] (embed_face, embed_audio).

    forward(mouth_windows [B, 15, 48, 96], mels [B, 1, 80, 16]) -> P(in sync) [B] in [0, 1], the
    score a generator's sync loss takes -log of (what dubber.train.dck expects of an expert).
    Unlike Wav2Lip there is no ReLU before normalisation, so cosine similarity spans [-1, 1] and
    P = (1 + cos) / 2: with the ReLU, the synthetic sync task of tests/test_syncnet.py reached
    0.5-0.8 offset accuracy in 60 steps instead of 0.9-1.0.
    """

    def __init__(self, base_channels: int = BASE_CHANNELS, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.init_kwargs = dict(base_channels=base_channels, embed_dim=embed_dim)
        self.meta: dict = {}

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


def sync_loss(face_emb: torch.Tensor, audio_emb: torch.Tensor, is_synced: torch.Tensor) -> torch.Tensor:
    """Wav2Lip's expert loss: BCE of the sync score (sync_probability) against 1 = in sync, 0 = not.

    face_emb, audio_emb [B, D] unit norm; is_synced [B] (bool or 0/1). A generator trained against a
    frozen expert calls it with is_synced all ones. (Wav2Lip's embeddings pass a ReLU, so it uses
    the cosine itself; ours span the sphere, hence the (1 + cos) / 2.)
    """
    probability = sync_probability(face_emb, audio_emb).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(probability, is_synced.to(probability.dtype))


def offset_choice_loss(face_emb: torch.Tensor, audio_emb: torch.Tensor, target: torch.Tensor,
                       exclude: Optional[torch.Tensor] = None,
                       temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE over audio: each mouth window picks its own audio among all the audio it is shown.

    face_emb [B, D], audio_emb [A, D] (unit norm); target [B] int: the row of audio_emb each window
    was spoken with; exclude [B, A] bool marks rows that must not count as negatives (the same
    clip within a frame of the truth, which offset search counts as right). Cross-entropy of
    softmax(cosine / temperature) over the rows left.

    Why not Wav2Lip's BCE on one pair at a time: shown the same clip's audio at every offset the
    evaluation searches, the model is trained on the very decision offset search makes; on little
    data, BCE sits at log 2 for thousands of steps.
    """
    return F.cross_entropy(offset_choice_logits(face_emb, audio_emb, exclude, temperature), target)


def offset_choice_logits(face_emb: torch.Tensor, audio_emb: torch.Tensor, exclude: Optional[torch.Tensor] = None,
                         temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """The logits offset_choice_loss takes the cross-entropy of: [B, A], -inf where excluded."""
    logits = face_emb @ audio_emb.T / temperature
    return logits if exclude is None else logits.masked_fill(exclude, float("-inf"))


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


def _mouth_tensor(mouths: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """[T, 3, 48, 96] float in [0, 1], or uint8 [T, 48, 96, 3] as stored -> float tensor [T, 3, 48, 96]."""
    mouths = torch.as_tensor(np.asarray(mouths) if not isinstance(mouths, torch.Tensor) else mouths)
    if mouths.dtype == torch.uint8 and mouths.dim() == 4 and mouths.shape[-1] == 3:
        mouths = mouths.permute(0, 3, 1, 2).float() / 255.0
    if mouths.dim() != 4 or tuple(mouths.shape[1:]) != (3, MOUTH_H, MOUTH_W):
        raise ValueError(f"mouths must be [T, 3, {MOUTH_H}, {MOUTH_W}] in [0, 1], got {tuple(mouths.shape)}")
    return mouths.float()


def _mel_tensor(mels: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """[T, 1, 80, 16] or [T, 80, 16] -> float tensor [T, 1, 80, 16]."""
    mels = torch.as_tensor(np.asarray(mels) if not isinstance(mels, torch.Tensor) else mels).float()
    if mels.dim() == 3:
        mels = mels[:, None]
    if mels.dim() != 4 or tuple(mels.shape[1:]) != (1, N_MELS, MEL_WIDTH):
        raise ValueError(f"mels must be [T, 1, {N_MELS}, {MEL_WIDTH}], got {tuple(mels.shape)}")
    return mels


def window_tensor(windows: np.ndarray) -> torch.Tensor:
    """Mouth windows uint8 [B, 5, 48, 96, 3] as stored -> float [B, 5, 3, 48, 96] in [0, 1]."""
    windows = np.asarray(windows)
    return _mouth_tensor(windows.reshape(-1, *windows.shape[2:])).view(windows.shape[0], MOUTH_FRAMES, 3, MOUTH_H, MOUTH_W)


def stack_windows(mouths: torch.Tensor, starts: Iterable[int]) -> torch.Tensor:
    """mouths [T, 3, 48, 96] -> mouth windows [len(starts), 15, 48, 96]: frames s..s+4, frame-major."""
    return torch.stack([mouths[s:s + MOUTH_FRAMES].reshape(3 * MOUTH_FRAMES, MOUTH_H, MOUTH_W) for s in starts])


@torch.no_grad()
def offset_distances(model: SyncNet, mouths, mels, offsets: Sequence[int] = OFFSETS) -> np.ndarray:
    """Distance matrix for offset search: [W, O] float64, W = T - 4 windows, O = len(offsets).

    mouths: per-frame mouth crops [T, 3, 48, 96] in [0, 1] (uint8 [T, 48, 96, 3] also accepted);
    mels: per-frame mel windows [T, 1, 80, 16] (or [T, 80, 16]), mels[t] centred on frame t.
    Entry [w, o] is the Euclidean distance between the embedding of frames w..w+4 and that of the
    audio at frame w + 2 + offsets[o] (the middle frame, shifted); NaN where that frame is outside
    the clip. Distances of unit vectors lie in [0, 2]. With the default symmetric offsets the
    matrix is what dubber.eval.metrics.lse expects.
    """
    mouths, mels = _mouth_tensor(mouths), _mel_tensor(mels)
    frames = mouths.shape[0]
    if mels.shape[0] != frames:
        raise ValueError(f"{frames} mouth frames but {mels.shape[0]} mel windows")
    if frames < MOUTH_FRAMES:
        raise ValueError(f"need at least {MOUTH_FRAMES} frames, got {frames}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        starts = range(frames - MOUTH_FRAMES + 1)
        face = torch.cat([model.embed_face(stack_windows(mouths, starts[i:i + EVAL_BATCH]).to(device)).cpu()
                          for i in range(0, len(starts), EVAL_BATCH)])
        audio = torch.cat([model.embed_audio(mels[i:i + EVAL_BATCH].to(device)).cpu()
                           for i in range(0, frames, EVAL_BATCH)])
    finally:
        model.train(was_training)
    offsets = torch.as_tensor(list(offsets))
    audio_index = torch.arange(len(starts))[:, None] + MOUTH_FRAMES // 2 + offsets[None, :]  # [W, O]
    inside = (audio_index >= 0) & (audio_index < frames)
    distances = (face[:, None, :] - audio[audio_index.clamp(0, frames - 1)]).norm(dim=2).double()
    distances[~inside] = float("nan")
    return distances.numpy()


def sync_scores(model: SyncNet, mouths, mels, offsets: Sequence[int] = OFFSETS,
                expected_offset: int = 0, speech: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Sync of one clip: lse_d, lse_c, offset (frames, positive = mouth after sound), lse_d0 /
    lse_c0 at offset 0, the per-window lse_d_window / lse_c_window, and offset_accuracy = fraction
    of 5-frame windows whose own best offset is within +-1 frame of expected_offset (0 for a clip
    that should be in sync); with `speech` (bool [T], frames with speech) also
    offset_accuracy_speech over the windows centred on speech.

    Same inputs as offset_distances; offsets must be symmetric and consecutive (-c..c).
    """
    offsets = list(offsets)
    centre = len(offsets) // 2
    if offsets != list(range(-centre, centre + 1)):
        raise ValueError("offsets must be the consecutive range -c..c")
    distances = offset_distances(model, mouths, mels, offsets)
    scores = lse(distances)
    window_offsets = centre - np.nanargmin(distances, axis=1)  # same sign as lse's offset
    hits = np.abs(window_offsets - expected_offset) <= 1
    scores["offset_accuracy"] = float(np.mean(hits))
    if speech is not None:
        # Windows whose middle frame has speech: in silence there is no sync to find.
        voiced = np.asarray(speech, bool)[MOUTH_FRAMES // 2: MOUTH_FRAMES // 2 + len(hits)]
        scores["offset_accuracy_speech"] = float(np.mean(hits[voiced])) if voiced.any() else float("nan")
    return scores
