"""Recipe of the rewrite backbone's stage 1 (dubber.backbones.rewrite): audio -> mouth.

Each sample is one frame: the 0.5 s of audio round it (at the clip's measured lag) and its real
mouth in the model's crop (from the cache's 128 px box transforms: box crops of any size are the
same window, scaled) -- the 20 mouth points where they are in the crop (with `centred`: about
their centroid), minus their mean over the clip's run, the person's resting average (inference
subtracts the mean over the video being dubbed: the same quantity). Half the samples are mirrored
left-right (points and their order; the sound is the same), each sample's loudness is jittered
and a run of mel bands and one of mel frames are hidden (SpecAugment). Loss: L1 on the points,
pixels. With `temporal` > 0 (the model's layers across frames) a sample is a run of SEQUENCE
frames instead (an ablation: it overfits sooner, weights/README.md).

Validation, on held-out identities: `val_lmd`, the mean point distance to the real points, each
run's mean position removed, as dubber.eval's LMD does -- selected on; `val_still_lmd`, the same
for a mouth that never moves (its mean: what a still frame scores at best); `val_shape_error` and
`val_still_error`, the same for the shapes alone (each frame about its centroid); and
`val_opening_corr`, Pearson r of the predicted inner-lip opening with the real one.
"""

from typing import ClassVar, Dict, Sequence

import numpy as np
import torch

from dubber.audio import MEL_MAX, MEL_MIN
from dubber.backbones.rewrite import MOTION_GAIN, Rewrite
from dubber.eval import metrics
from dubber.face.align import transform_points
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.face.landmarks import MOUTH, MOUTH_MIRROR, centred_mouth, inner_opening
from dubber.train import distributed
from dubber.train.augment import spec_augment
from dubber.train.recipes import Recipe, recipe

BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
MIRROR_PROBABILITY = 0.5
GAIN_JITTER = 0.5  # log-mel units (8 = 100 dB): each sample's loudness moved by up to +-6 dB
DROPOUT = 0.3
FREQUENCY_MASK = 16  # SpecAugment (Park et al. 2019): up to this many adjacent mel bands of a sample hidden
TIME_MASK = 8  # ... and up to this many adjacent mel frames (of MOTION_MEL_WIDTH)
CENTRED = False  # True: predict each frame's shape about its centroid only, not where the lips are (ablation)
TEMPORAL = 0  # temporal layers of the model (dubber.backbones.rewrite); > 0 trains on runs of SEQUENCE frames
SEQUENCE = 16
VAL_BATCH = 512
LANDMARK_CROP = CropSpec(CROP_BOX, 128)  # the clips' landmarks come in the transforms of this cached crop


def mouth_points(clip: dict) -> np.ndarray:
    """The run's 20 mouth points in the model's crop -> float32 [T, 20, 2] crop pixels (cached in the clip dict)."""
    if "mouth_points" not in clip:
        scale = Rewrite.crop.size / LANDMARK_CROP.size
        clip["mouth_points"] = (scale * np.stack([
            transform_points(lm[MOUTH], m)
            for lm, m in zip(clip["landmarks"], clip["transforms"][LANDMARK_CROP.key])])).astype(np.float32)
    return clip["mouth_points"]


def mouth_shapes(clip: dict, centred: bool = True) -> np.ndarray:
    """The run's mouth shapes in the model's crop, minus their mean over the run -> float32 [T, 20, 2]
    crop pixels; centred: each frame's points about their own centroid (the shape alone), else where
    they are in the aligned crop (the lips' movement as a whole too: the jaw drops). The centred
    mean, the person's average shape [20, 2], is kept as clip["mouth_mean"]."""
    key = "mouth_shapes" if centred else "mouth_moves"
    if key not in clip:
        points = centred_mouth(mouth_points(clip)) if centred else mouth_points(clip)
        mean = points.mean(0).astype(np.float32)
        if centred:
            clip["mouth_mean"] = mean
        clip[key] = (points - mean).astype(np.float32)
    return clip[key]


def mirrored(shapes: np.ndarray) -> np.ndarray:
    """Mouth deviations [..., 20, 2] (from a mean, or about the centroid) of the mirror image: x negated,
    points re-ordered."""
    out = shapes[..., list(MOUTH_MIRROR), :].copy()
    out[..., 0] *= -1
    return out


@recipe
class RewriteRecipe(Recipe):
    model = "rewrite"
    select_metric = "val_lmd"
    ship_half: ClassVar[bool] = False  # 1.6 MB in fp32
    validation_clips: ClassVar[int] = 200  # every val_select clip: no pixels; 0.3 s for its 67 runs
    needs_pixels: ClassVar[bool] = False  # landmarks (through the crop's transforms) and audio only
    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    mirror_probability: float = MIRROR_PROBABILITY
    gain_jitter: float = GAIN_JITTER
    dropout: float = DROPOUT
    frequency_mask: int = FREQUENCY_MASK
    time_mask: int = TIME_MASK
    temporal: int = TEMPORAL
    centred: bool = CENTRED
    motion_gain: float = MOTION_GAIN  # the model's scaling of its motion at inference (and validation)
    init: str = ""  # path of a rewrite file to start from (fine-tuning, dubber adapt) instead of a fresh model

    def crops(self) -> Sequence[CropSpec]:
        return [LANDMARK_CROP]

    def build(self):
        return {"model": self.initialised(Rewrite(dropout=self.dropout, temporal=self.temporal, centred=self.centred,
                                                      motion_gain=self.motion_gain), self.init)}

    @property
    def sequence(self) -> int:
        """Frames per sample: runs for a temporal model, single frames otherwise."""
        return SEQUENCE if self.temporal else 1

    def optimizers(self, modules):
        return {"model": torch.optim.AdamW(modules["model"].parameters(), lr=self.lr, weight_decay=self.weight_decay)}

    def anchors(self, clip: dict) -> np.ndarray:
        return np.arange(len(clip["mels"]) - self.sequence + 1)

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        length = self.sequence
        mels, shapes = [], []
        for _ in range(max(1, self.batch_size // length) * distributed.world_size()):
            index, frame = sampler.draw(rng)
            clip = sampler.clips[index]
            mels.append(clip["mels"][frame:frame + length])
            shapes.append(mouth_shapes(clip, self.centred)[frame:frame + length])
        shapes = np.stack(shapes)  # [N, T, 20, 2]
        flip = rng.random(len(shapes)) < self.mirror_probability
        shapes[flip] = mirrored(shapes[flip])
        mels = np.stack(mels)  # [N, T, 80, W]
        if self.gain_jitter:  # another microphone, another level: a shift of the log-mel, clipped as audio clips it
            gain = rng.uniform(-self.gain_jitter, self.gain_jitter, (len(mels), 1, 1, 1)).astype(np.float32)
            mels = np.clip(mels + gain, MEL_MIN, MEL_MAX)
        if self.frequency_mask or self.time_mask:
            mels = spec_augment(mels, rng, self.frequency_mask, self.time_mask)
        mel = torch.from_numpy(distributed.shard(mels)).to(device).float()[:, :, None]
        target = torch.from_numpy(distributed.shard(shapes)).to(device)
        predicted = modules["model"](None, mel).points
        loss = (predicted - target).abs().mean()
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        return {"l1": loss.item()}

    def validate(self, modules, clips, device) -> Dict[str, float]:
        model = modules["model"]
        errors, stills, lmds, still_lmds, predicted_open, real_open = [], [], [], [], [], []
        with torch.no_grad():
            for clip in clips:
                real = mouth_shapes(clip)
                out = []
                for start in range(0, len(real), VAL_BATCH):
                    # a whole run at once, as one window: the temporal layers and smoothing see its frames
                    mel = torch.from_numpy(clip["mels"][start:start + VAL_BATCH]).to(device).float()[None, :, None]
                    out.append(model(None, mel).points[0].float().cpu().numpy())
                pred = np.concatenate(out)
                pred = pred - pred.mean(0)  # each sequence's mean removed, as LMD does
                shape = centred_mouth(pred)  # the shape alone (a centred model's is already)
                errors.append(np.linalg.norm(shape - real, axis=-1).mean())
                stills.append(np.linalg.norm(real, axis=-1).mean())
                # dubber.eval's LMD: the points where they are, each run's mean position removed
                points = mouth_points(clip)
                lmds.append(metrics.mouth_landmark_distance(points.mean(0) + pred, points))
                still_lmds.append(metrics.mean_mouth_distance(points))
                # openings of whole shapes (the person's mean + the deviation): a deviation's own
                # "opening" would be its size, not how far the lips are apart
                for shapes, into in ((shape, predicted_open), (real, real_open)):
                    opening = inner_opening(clip["mouth_mean"] + shapes)
                    into.append(opening - opening.mean())
        p, r = np.concatenate(predicted_open), np.concatenate(real_open)
        corr = float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 and r.std() > 0 else 0.0
        return {"val_shape_error": float(np.mean(errors)), "val_still_error": float(np.mean(stills)),
                "val_lmd": float(np.mean(lmds)), "val_still_lmd": float(np.mean(still_lmds)),
                "val_opening_corr": corr}
