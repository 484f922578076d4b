"""Recipe of the rewrite backbone's stage 1 (dubber.backbones.rewrite): audio -> mouth shape.

Each sample is one frame: the 0.5 s of audio round it (at the clip's measured lag) and the shape of
its real mouth in the model's crop (from the cache's 128 px box transforms: box crops of any size
are the same window, scaled) -- the 20 mouth points about their centroid, minus the
mean of that shape over the clip's run, the person's resting average (inference subtracts the
mean over the video being dubbed: the same quantity). Half the samples are mirrored left-right
(points and their order; the sound is the same), and each sample's loudness is jittered. Loss: L1
on the points, pixels. With `temporal` > 0 (the model's layers across frames) a sample is a run of
SEQUENCE frames instead (an ablation: it overfits sooner, weights/README.md).

Validation, on held-out identities: `val_shape_error`, the mean point distance to the real shape
(each sequence's mean shape removed, as LMD does) -- selected on; `val_still_error`, the same for a
mouth that never moves (its mean shape: what a still frame scores at best); and
`val_opening_corr`, Pearson r of the predicted inner-lip opening with the real one.
"""

from typing import ClassVar, Dict, Sequence

import numpy as np
import torch

from dubber.audio import MEL_MAX, MEL_MIN
from dubber.backbones.rewrite import Rewrite
from dubber.face.align import transform_points
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.face.landmarks import MOUTH, MOUTH_MIRROR, centred_mouth, inner_opening
from dubber.train import distributed
from dubber.train.recipes import Recipe, recipe

BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
MIRROR_PROBABILITY = 0.5
GAIN_JITTER = 0.5  # log-mel units (8 = 100 dB): each sample's loudness moved by up to +-6 dB
DROPOUT = 0.3
TEMPORAL = 0  # temporal layers of the model (dubber.backbones.rewrite); > 0 trains on runs of SEQUENCE frames
SEQUENCE = 16
VAL_BATCH = 512
LANDMARK_CROP = CropSpec(CROP_BOX, 128)  # the clips' landmarks come in the transforms of this cached crop


def mouth_shapes(clip: dict) -> np.ndarray:
    """The run's mouth shapes in the model's crop: each frame's 20 points about their centroid, minus
    the run's mean shape -> float32 [T, 20, 2] crop pixels (cached in the clip dict, with that mean
    shape [20, 2] as clip["mouth_mean"])."""
    if "mouth_shapes" not in clip:
        scale = Rewrite.crop.size / LANDMARK_CROP.size
        points = scale * np.stack([transform_points(lm[MOUTH], m)
                                   for lm, m in zip(clip["landmarks"], clip["transforms"][LANDMARK_CROP.key])])
        centred = centred_mouth(points)
        clip["mouth_mean"] = centred.mean(0).astype(np.float32)
        clip["mouth_shapes"] = (centred - clip["mouth_mean"]).astype(np.float32)
    return clip["mouth_shapes"]


def mirrored(shapes: np.ndarray) -> np.ndarray:
    """Mouth shapes [..., 20, 2] of the mirror image: x negated (they are centred), points re-ordered."""
    out = shapes[..., list(MOUTH_MIRROR), :].copy()
    out[..., 0] *= -1
    return out


@recipe
class RewriteRecipe(Recipe):
    model = "rewrite"
    select_metric = "val_shape_error"
    ship_half: ClassVar[bool] = False  # 1.6 MB in fp32
    validation_clips: ClassVar[int] = 200  # every val_select clip: no pixels; 0.3 s for its 67 runs
    needs_pixels: ClassVar[bool] = False  # landmarks (through the crop's transforms) and audio only
    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    mirror_probability: float = MIRROR_PROBABILITY
    gain_jitter: float = GAIN_JITTER
    dropout: float = DROPOUT
    temporal: int = TEMPORAL
    init: str = ""  # path of a rewrite file to start from (fine-tuning, dubber adapt) instead of a fresh model

    def crops(self) -> Sequence[CropSpec]:
        return [LANDMARK_CROP]

    def build(self):
        return {"model": self.initialised(Rewrite(dropout=self.dropout, temporal=self.temporal), self.init)}

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
            shapes.append(mouth_shapes(clip)[frame:frame + length])
        shapes = np.stack(shapes)  # [N, T, 20, 2]
        flip = rng.random(len(shapes)) < self.mirror_probability
        shapes[flip] = mirrored(shapes[flip])
        mels = np.stack(mels)  # [N, T, 80, W]
        if self.gain_jitter:  # another microphone, another level: a shift of the log-mel, clipped as audio clips it
            gain = rng.uniform(-self.gain_jitter, self.gain_jitter, (len(mels), 1, 1, 1)).astype(np.float32)
            mels = np.clip(mels + gain, MEL_MIN, MEL_MAX)
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
        errors, stills, predicted_open, real_open = [], [], [], []
        with torch.no_grad():
            for clip in clips:
                real = mouth_shapes(clip)
                out = []
                for start in range(0, len(real), VAL_BATCH):
                    # a whole run at once, as one window: the temporal layers and smoothing see its frames
                    mel = torch.from_numpy(clip["mels"][start:start + VAL_BATCH]).to(device).float()[None, :, None]
                    out.append(model(None, mel).points[0].float().cpu().numpy())
                pred = np.concatenate(out)
                pred = pred - pred.mean(0)  # each sequence's mean shape removed, as LMD does
                errors.append(np.linalg.norm(pred - real, axis=-1).mean())
                stills.append(np.linalg.norm(real, axis=-1).mean())
                # openings of whole shapes (the person's mean + the deviation): a deviation's own
                # "opening" would be its size, not how far the lips are apart
                for shapes, into in ((pred, predicted_open), (real, real_open)):
                    opening = inner_opening(clip["mouth_mean"] + shapes)
                    into.append(opening - opening.mean())
        p, r = np.concatenate(predicted_open), np.concatenate(real_open)
        corr = float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 and r.std() > 0 else 0.0
        return {"val_shape_error": float(np.mean(errors)), "val_still_error": float(np.mean(stills)),
                "val_opening_corr": corr}
