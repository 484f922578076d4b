"""Sync scores of a clip with the lip-sync expert (dubber.backbones.syncnet): the offset search
and Wav2Lip's LSE-D / LSE-C (dubber.eval.metrics.lse), AV offset and per-window offset accuracy."""

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from dubber.backbones.syncnet import MOUTH_FRAMES, OFFSET_RANGE, SyncNet, mel_tensor, mouth_tensor, stack_windows
from dubber.eval.metrics import lse

OFFSETS = range(-OFFSET_RANGE, OFFSET_RANGE + 1)  # audio shifts searched, video frames
EVAL_BATCH = 128  # windows per forward pass in offset_distances


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
    mouths, mels = mouth_tensor(mouths), mel_tensor(mels)
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
                expected_offset: int = 0, speech: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Sync of one clip: lse_d, lse_c, offset (frames, positive = mouth after sound), lse_d0 /
    lse_c0 at offset 0, the per-window lse_d_window / lse_c_window, the window-averaged distance
    curve ([O] array, metrics.lse), and offset_accuracy = fraction
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
