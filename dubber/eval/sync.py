"""Sync scores of a clip with the lip-sync expert (dubber.backbones.syncnet): the offset search
and Wav2Lip's LSE-D / LSE-C (dubber.eval.metrics.lse), AV offset and per-window offset accuracy;
and the expert's inputs cut from a video: mouth crops (mouth_crops) and per-frame audio (frame_audio)."""

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from dubber import audio as audio_features
from dubber.backbones.syncnet import (FACE_CROP, MOUTH_FRAMES, MOUTH_H, MOUTH_W, OFFSET_RANGE, SyncNet, mel_tensor,
                                      mouth_tensor, mouths_from_faces, stack_windows)
from dubber.eval.metrics import lse
from dubber.face.align import crop_transforms, warp_crop

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
    mels = mel_tensor(mels)
    frames = len(mouths)
    if mels.shape[0] != frames:
        raise ValueError(f"{frames} mouth frames but {mels.shape[0]} mel windows")
    if frames < MOUTH_FRAMES:
        raise ValueError(f"need at least {MOUTH_FRAMES} frames, got {frames}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    offsets = torch.as_tensor(list(offsets))
    windows = frames - MOUTH_FRAMES + 1
    distances = torch.empty(windows, len(offsets), dtype=torch.float64)
    try:
        audio = torch.cat([model.embed_audio(mels[i:i + EVAL_BATCH].to(device)).cpu()
                           for i in range(0, frames, EVAL_BATCH)])
        # A batch of windows at a time, from its own frames: memory stays that of one batch
        # (a whole long clip as float crops, or its [W, O, 256] differences, would not fit).
        for i in range(0, windows, EVAL_BATCH):
            starts = range(min(EVAL_BATCH, windows - i))
            part = mouth_tensor(mouths[i:i + len(starts) + MOUTH_FRAMES - 1])
            face = model.embed_face(stack_windows(part, starts).to(device)).cpu()
            index = (i + torch.arange(len(starts)))[:, None] + MOUTH_FRAMES // 2 + offsets[None, :]  # [B, O]
            distances[i:i + len(starts)] = (face[:, None, :] - audio[index.clamp(0, frames - 1)]).norm(dim=2).double()
    finally:
        model.train(was_training)
    audio_index = torch.arange(windows)[:, None] + MOUTH_FRAMES // 2 + offsets[None, :]  # [W, O]
    distances[(audio_index < 0) | (audio_index >= frames)] = float("nan")
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


def mouth_crops(frames: Iterable[np.ndarray], landmarks: np.ndarray,
                on_frame: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The expert's mouth crops of a video: frames uint8 BGR (any iterable, read once) and their
    landmarks [T, 68, 2] (NaN where no face) -> uint8 RGB [T, 48, 96, 3], black where no face.

    Each is the lower half of the RSA-aligned FACE_CROP (crop_transforms, smoothed over the frames
    with a face), as the expert was trained on. Frames past len(landmarks) are not read.
    """
    landmarks = np.asarray(landmarks)
    valid = ~np.isnan(landmarks[:, 0, 0])
    transforms = crop_transforms(landmarks, FACE_CROP)
    out = np.zeros((len(landmarks), MOUTH_H, MOUTH_W, 3), np.uint8)
    for t, frame in zip(range(len(landmarks)), frames):
        if valid[t]:
            out[t] = mouths_from_faces(warp_crop(frame, transforms[t], FACE_CROP.size)[None, ..., ::-1])[0]
        if on_frame is not None:
            on_frame(t)
    return out


def frame_audio(wav: np.ndarray, frames: int, fps: float, mels: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """A speech track at the times of a video's frames: wav [n] at audio.SAMPLE_RATE -> (mel windows
    [frames, 80, 16] centred on each frame, or None without `mels`; envelope [frames]; speech bool
    [frames], audio.speech_frames). Frames past the end of the track get silence."""
    times = np.arange(frames) / fps
    envelope = audio_features.envelope(wav, times)
    windows = audio_features.mel_windows(audio_features.log_mel(wav), times, audio_features.MEL_WINDOW) if mels else None
    return windows, envelope, audio_features.speech_frames(envelope)
