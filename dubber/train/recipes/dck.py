"""Recipe for DCK (dubber.backbones.dck), self-supervised on real clips.

The paper trains on pairs of videos that differ only in the lips, made with Wav2Lip; we have no
such pairs, so every training sample is built from one real clip instead. For a target frame t:

  identity   a random frame of the same clip, at least MIN_FRAME_GAP frames from t: texture
             (teeth, lips), never the answer (at inference: one closed-mouth frame per video);
  blend base I: frame t with the mouth-and-chin ellipse (backbones.dck.mouth_region) of another
             distant frame, the mouth donor, so the mouth in I is wrong and copying it is penalised,
             while cheeks and nose stay exact (at inference the donor is the identity frame);
  input      I with its lower half zeroed, plus the identity frame (DCK.forward masks I itself);
  audio      the mel window of frame t;   target  frame t.

Loss: LAMBDA_REC * L1 (lower half weighted by MOUTH_WEIGHT: the mouth is a small part of the crop
but all of the task) + ADV_WEIGHT * LSGAN after ADV_START reconstruction-only steps, plus, when a
lip-sync expert is given, SYNC_WEIGHT * its -log P(in sync) on windows of SYNC_WINDOW generated
frames, seen as the expert sees real video (warped to its aligned mouth view).
"""

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from dubber.backbones.dck import DCK, SIZE
from dubber.backbones.syncnet import FACE_CROP, MOUTH_FRAMES, MOUTH_H
from dubber.face.align import compose_affine, inverse_affine
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.train import distributed
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.discriminators import PatchDiscriminator
from dubber.train.recipes import Recipe, recipe
from dubber.train.sampler import distant_frame
from dubber.train.validate import generator_figures
from dubber.train.warp import resample

BATCH_SIZE = 16
LEARNING_RATE = 2e-4
ADAM_BETAS = (0.5, 0.999)  # the usual GAN setting: less momentum than Adam's default 0.9
LAMBDA_REC = 10.0  # paper, Eq. 5
ADV_WEIGHT = 1.0
ADV_START = 2000  # steps; before this the GAN would judge blurry faces and only add noise
MOUTH_WEIGHT = 3.0  # L1 weight of the lower half of the crop relative to the upper half
SYNC_WEIGHT = 0.3  # Wav2Lip's 0.03 : 0.97 sync-to-L1 ratio, times our LAMBDA_REC
SYNC_WINDOW = MOUTH_FRAMES  # consecutive frames the lip-sync expert judges (0.2 s at 25 fps)
# Frames between the target and its identity frame / mouth donor (different mouths). Shorter
# clips are skipped: an identity next to the target shows the answer's mouth, and the model would
# learn to copy instead of listening.
MIN_FRAME_GAP = 5
MIN_CLIP_FRAMES = 2 * MIN_FRAME_GAP
COLOUR_JITTER = 0.08  # brightness shift, contrast and saturation factors within +-8 %


@recipe
class DCKRecipe(Recipe):
    model = "dck"
    identity_power = 0.0
    select_metric = "val_lmd"

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    adam_betas: Tuple[float, float] = ADAM_BETAS
    size: int = SIZE
    lambda_rec: float = LAMBDA_REC
    adv_weight: float = ADV_WEIGHT
    adv_start: int = ADV_START
    mouth_weight: float = MOUTH_WEIGHT
    sync_weight: float = SYNC_WEIGHT
    sync_expert: str = ""  # path of a trained syncnet file: adds the sync loss
    colour_jitter: float = COLOUR_JITTER
    init: str = ""  # path of a dck file to start from (fine-tuning) instead of a fresh model

    @property
    def window(self) -> int:
        return SYNC_WINDOW if self.sync_expert else 1

    def crops(self) -> Sequence[CropSpec]:
        return [CropSpec(CROP_BOX, self.size)] + ([FACE_CROP] if self.sync_expert else [])

    def build(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.initialised(DCK(size=self.size), self.init), "disc": PatchDiscriminator()}

    def optimizers(self, modules):
        return {name: torch.optim.Adam(modules[module].parameters(), lr=self.lr, betas=tuple(self.adam_betas))
                for name, module in (("g", "model"), ("d", "disc"))}

    def anchors(self, clip: dict) -> np.ndarray:
        frames = len(clip["mels"])
        return np.arange(frames - self.window + 1) if frames >= max(self.window, MIN_CLIP_FRAMES) else np.zeros(0, int)

    def _expert(self, device):
        if not hasattr(self, "_loaded_expert"):
            from dubber.backbones import load

            self._loaded_expert = load("syncnet", self.sync_expert).requires_grad_(False)
        return self._loaded_expert.to(device).eval()

    def draw(self, sampler, rng: np.random.Generator):
        """-> images uint8 RGB [N, 3, S, S, 3] (target, identity frame, mouth donor), mels
        [N, 80, W] and, with a sync expert, the targets' crop->expert-view affines [N, 2, 3].
        N = rows * window; each run of `window` rows is consecutive frames of one clip. Under
        torchrun N is the step's batch, over all processes (dubber.train.distributed)."""
        key = CropSpec(CROP_BOX, self.size).key
        images, mels, geometry = [], [], []
        for _ in range(max(1, self.batch_size // self.window) * distributed.world_size()):
            index, start = sampler.draw(rng)
            clip = sampler.clips[index]
            crops = clip["crops"][key]
            for t in range(start, start + self.window):
                images.append(np.stack([crops[t], crops[distant_frame(len(crops), t, 1, MIN_FRAME_GAP, rng)],
                                        crops[distant_frame(len(crops), t, 1, MIN_FRAME_GAP, rng)]]))
                mels.append(clip["mels"][t])
                if self.sync_expert:
                    geometry.append(compose_affine(clip["transforms"][key][t],
                                                   inverse_affine(clip["transforms"][FACE_CROP.key][t])))
        return np.stack(images), np.stack(mels), np.stack(geometry) if geometry else None

    def batch(self, sampler, rng: np.random.Generator, device):
        """draw(), augmented alike within each window, as tensors: targets, references, donors
        [N, 3, S, S] in [0, 1], mels [N, 1, 80, W], flipped [N, 1, 1, 1] (and crop_from_expert)."""
        images, mels, geometry = self.draw(sampler, rng)
        window = self.window
        pixels = to_float(images, device)  # [N, 3 kinds, 3, S, S]
        pixels = pixels.view(-1, window * 3, *pixels.shape[2:])
        jitter = Jitter(self.colour_jitter, self.colour_jitter, self.colour_jitter)
        pixels, flipped = augment(pixels, rng, jitter)
        pixels = pixels.view(-1, 3, *pixels.shape[2:])
        batch = {"targets": pixels[:, 0], "references": pixels[:, 1], "donors": pixels[:, 2],
                 "mels": torch.from_numpy(mels).to(device).float().unsqueeze(1),
                 "flipped": flipped.repeat_interleave(window).view(-1, 1, 1, 1)}
        if geometry is not None:
            batch["crop_from_expert"] = torch.from_numpy(geometry).to(device)
        return batch

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model, disc = modules["model"], modules["disc"]
        batch = {name: distributed.shard(rows) for name, rows in self.batch(sampler, rng, device).items()}
        targets = batch["targets"]
        adversarial = step >= self.adv_start
        generated = model(targets[:, None], batch["mels"][:, None], batch["references"],
                          mouth_donors=batch["donors"][:, None]).images[:, 0]
        l1 = ((generated - targets).abs() * _mouth_weights(self.size, self.mouth_weight, device)).mean()
        loss_g = self.lambda_rec * l1
        losses = {"l1": l1.item()}
        if adversarial:
            g_adv = ((disc(generated) - 1) ** 2).mean()
            loss_g = loss_g + self.adv_weight * g_adv
            losses["g_adv"] = g_adv.item()
        if self.sync_expert and adversarial:
            unflipped = torch.where(batch["flipped"], generated.flip(-1), generated)
            sync = sync_loss(self._expert(device), unflipped, batch["mels"], batch["crop_from_expert"])
            loss_g = loss_g + self.sync_weight * sync
            losses["sync"] = sync.item()
        optimizers["g"].zero_grad(set_to_none=True)
        loss_g.backward()
        optimizers["g"].step()
        if adversarial:
            # LSGAN (paper Eq. 4): real towards 1, generated towards 0.
            loss_d = 0.5 * (((disc(targets) - 1) ** 2).mean() + (disc(generated.detach()) ** 2).mean())
            optimizers["d"].zero_grad(set_to_none=True)
            loss_d.backward()
            optimizers["d"].step()
            losses["d"] = loss_d.item()
        losses["total_g"] = loss_g.item()
        return losses

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)


def _mouth_weights(size: int, mouth_weight: float, device: torch.device) -> torch.Tensor:
    """Per-row L1 weights [1, 1, S, 1]: lower half mouth_weight, upper half 1, mean 1."""
    rows = torch.ones(size, device=device)
    rows[size // 2:] = mouth_weight
    return (rows / rows.mean()).view(1, 1, size, 1)


def expert_mouths(images: torch.Tensor, crop_from_expert: torch.Tensor) -> torch.Tensor:
    """Crops [N, 3, S, S] -> the expert's mouth view [N, 3, 48, 96]: the rows of its aligned face
    that dubber.backbones.syncnet.mouths_from_faces keeps, resampled through the pixel affines
    crop_from_expert [N, 2, 3] (dubber.train.warp: differentiable)."""
    face = FACE_CROP.size
    return resample(images, crop_from_expert, torch.arange(face - MOUTH_H, face, device=images.device),
                    torch.arange(face, device=images.device))


def sync_loss(expert: torch.nn.Module, generated: torch.Tensor, mels: torch.Tensor,
              crop_from_expert: torch.Tensor) -> torch.Tensor:
    """-log P(in sync) of windows of SYNC_WINDOW consecutive generated frames [N, 3, S, S]
    (unflipped), seen as the expert sees real video (expert_mouths), averaged. mels [N, 1, 80, W]:
    each window is judged with its middle frame's."""
    windows = generated.shape[0] // SYNC_WINDOW
    mouths = expert_mouths(generated, crop_from_expert)
    mouth_windows = mouths.reshape(windows, SYNC_WINDOW * 3, *mouths.shape[-2:])  # rows are frame-major
    centre_mels = mels.view(windows, SYNC_WINDOW, *mels.shape[1:])[:, SYNC_WINDOW // 2]
    return -torch.log(expert(mouth_windows, centre_mels).clamp(1e-6, 1.0)).mean()
