"""Validation of generators during training: held-out clips through the same runner lipsync uses
(dubber.apply), identity chosen by the backbone's own conditioning strategy, scored with the
evaluation's metrics on the crops -- no decode, paste or encode, so it costs seconds.

Figures: val_lmd (mouth-landmark distance, dlib landmarks refitted on generated and real crops
from the same box) beside two still baselines: val_lmd_static, the real points of the clip's first
frame held still, and val_lmd_identity, the identity face the model is given held still and
refitted as the generated crops are (what a generator that copies its input scores: the baseline it
must beat; the two differ by the frame chosen and by the refit); val_l1_lower (mean absolute error
of the crop's lower half, [0, 1] scale) and val_psnr_lower (dB).
"""

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from dubber.apply import Generator, Step, apply_backbone
from dubber.backbones.base import Backbone
from dubber.conditioning import identity_frame
from dubber.eval import metrics
from dubber.face.align import transform_points
from dubber.face.landmarks import predict_landmarks

VAL_MAX_FRAMES = 75  # frames of each validation clip used (3 s at 25 fps)


def generate_clip(model: Backbone, clip: dict, device: torch.device, index: Optional[int]) -> np.ndarray:
    """The model's crops for a clip (its own audio), given crop `index` as identity (None: none):
    uint8 RGB [T, S, S, 3], T = the clip's frames (at most VAL_MAX_FRAMES)."""
    crops = clip["crops"][model.crop.key][:VAL_MAX_FRAMES]
    identity = None if index is None else crops[index][..., ::-1]
    generator = Generator(model, device)
    steps = (Step(crop[..., ::-1], mel) for crop, mel in zip(crops, clip["mels"]))
    out = [generated[..., ::-1] for _, _, generated in apply_backbone(generator, steps, identity)]
    return np.ascontiguousarray(np.stack(out))


def _identity_index(model: Backbone, clip: dict) -> Optional[int]:
    """The frame the backbone's conditioning strategy gives it as identity (None: it takes none)."""
    transforms = clip["transforms"][model.crop.key][:VAL_MAX_FRAMES]
    return identity_frame(model.conditioning, clip["landmarks"][:VAL_MAX_FRAMES], transforms)


def _crop_landmarks(crops: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([predict_landmarks(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), b) for c, b in zip(crops, boxes)])


def generator_figures(model: Backbone, clips: Sequence[dict], device: torch.device) -> Dict[str, float]:
    """Mean val_lmd, val_lmd_static, val_lmd_identity (when the backbone takes an identity face),
    val_l1_lower, val_psnr_lower over clips."""
    was_training = model.training
    lmd, static, copied, l1, psnr = [], [], [], [], []
    key = model.crop.key
    for clip in clips:
        index = _identity_index(model, clip)
        generated = generate_clip(model, clip, device, index)
        real = clip["crops"][key][: len(generated)]
        points = np.stack([transform_points(p, m) for p, m in
                           zip(clip["landmarks"][: len(generated)], clip["transforms"][key][: len(generated)])])
        boxes = np.concatenate([points.min(1), points.max(1)], axis=1)  # one box for both: same fit
        real_points = _crop_landmarks(real, boxes)
        lmd.append(metrics.mouth_landmark_distance(_crop_landmarks(generated, boxes), real_points))
        still = np.repeat(real_points[:1], len(real_points), axis=0)
        static.append(metrics.mouth_landmark_distance(still, real_points))
        if index is not None:
            identity = np.repeat(real[index:index + 1], len(real), axis=0)
            copied.append(metrics.mouth_landmark_distance(_crop_landmarks(identity, boxes), real_points))
        half = real.shape[1] // 2
        lower_g, lower_r = generated[:, half:].astype(np.float32), real[:, half:].astype(np.float32)
        l1.append(float(np.abs(lower_g - lower_r).mean() / 255))
        psnr.append(metrics.psnr(lower_g, lower_r, cap_db=100.0))
    model.train(was_training)
    figures = {"val_lmd": float(np.mean(lmd)), "val_lmd_static": float(np.mean(static))}
    if copied:
        figures["val_lmd_identity"] = float(np.mean(copied))
    return {**figures, "val_l1_lower": float(np.mean(l1)), "val_psnr_lower": float(np.mean(psnr))}
