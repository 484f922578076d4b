"""Recipe of CRAN (dubber.backbones.cran): the paper's objective (its Eq. 5),

    L = L_rec + lambda_I L_I + lambda_V L_V  (+ lambda_l L_l: the lip-reading critic, not yet here),

with the paper's weights 1e-3 and 1e-2, reconstruction alone for the first adv_start steps and
then the discriminators (the paper: 30 epochs, then 15 with them), Adam 2e-4 with beta1 0.5.

A sample is SEQUENCE consecutive frames of one clip with their 350 ms audio windows, and an
identity face from the same clip at least IDENTITY_GAP frames away (never a frame being generated:
its mouth would be the answer). The recurrent unit starts from zero for each sample, as the
runner starts it at each run of frames.

- L_rec: L1 between the generated and the real frames.
- L_I: the image discriminator (dubber.train.discriminators.PatchDiscriminator) on single frames.
- L_V: the video discriminator (VideoDiscriminator, 3D convolutions) on the whole sequence: the
  smoothness between frames.
- L_l (the lip-reading discriminator on GRID's word labels) is the next piece of work: a lip
  reader trained on real mouths first (issue #15); until then `lambda_image`/`lambda_video` give
  the rest of the paper's loss ablation (reconstruction only, + image D, + video D).
"""

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from dubber.backbones.cran import CRAN, SIZE
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.train import distributed
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.discriminators import PatchDiscriminator, VideoDiscriminator, critic_loss
from dubber.train.recipes import Recipe, recipe
from dubber.train.sampler import distant_frame, sequence_anchors
from dubber.train.validate import generator_figures

BATCH_SIZE = 4  # sequences a step
SEQUENCE = 8  # frames a sample: enough for the video discriminator's 3D convolutions
LEARNING_RATE = 2e-4  # paper, Sec. 4.1
ADAM_BETAS = (0.5, 0.999)  # paper, Sec. 4.1
LAMBDA_IMAGE = 1e-3  # paper, Sec. 4.1
LAMBDA_VIDEO = 1e-2  # paper, Sec. 4.1
ADV_START = 2000  # steps of reconstruction alone before the discriminators join
IDENTITY_GAP = 5  # frames at least between the identity face and any frame of the sequence
COLOUR_JITTER = 0.08



@recipe
class CRANRecipe(Recipe):
    model = "cran"
    identity_power = 0.0
    select_metric = "val_lmd"

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    adam_betas: Tuple[float, float] = ADAM_BETAS
    lambda_image: float = LAMBDA_IMAGE
    lambda_video: float = LAMBDA_VIDEO
    adv_start: int = ADV_START
    colour_jitter: float = COLOUR_JITTER
    init: str = ""  # path of a cran file to start from instead of a fresh model

    @property
    def spec(self) -> CropSpec:
        return CropSpec(CROP_BOX, SIZE)

    def crops(self) -> Sequence[CropSpec]:
        return [self.spec]

    def build(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.initialised(CRAN(), self.init), "image": PatchDiscriminator(),
                "video": VideoDiscriminator()}

    def optimizers(self, modules):
        return {name: torch.optim.Adam(modules[name].parameters(), lr=self.lr, betas=tuple(self.adam_betas))
                for name in ("model", "image", "video")}

    def anchors(self, clip: dict) -> np.ndarray:
        return sequence_anchors(len(clip["mels"]), SEQUENCE, IDENTITY_GAP)

    def draw(self, sampler, rng: np.random.Generator):
        """-> images uint8 RGB [N, SEQUENCE + 1, S, S, 3] (the frames, then the identity face) and
        mels [N, SEQUENCE, 80, W]; N the step's batch over all processes."""
        images, mels = [], []
        for _ in range(self.batch_size * distributed.world_size()):
            index, start = sampler.draw(rng)
            clip = sampler.clips[index]
            crops = clip["crops"][self.spec.key]
            identity = distant_frame(len(crops), start, SEQUENCE, IDENTITY_GAP, rng)
            images.append(crops[list(range(start, start + SEQUENCE)) + [identity]])
            mels.append(clip["mels"][start:start + SEQUENCE])
        return np.stack(images), np.stack(mels)

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model, image_d, video_d = modules["model"], modules["image"], modules["video"]
        images, mels = self.draw(sampler, rng)
        jitter = Jitter(self.colour_jitter, self.colour_jitter, self.colour_jitter)
        pixels, _ = augment(to_float(images, device), rng, jitter)
        pixels = distributed.shard(pixels)
        mel = torch.from_numpy(distributed.shard(mels)).to(device).float().unsqueeze(2)  # [B, T, 1, 80, W]
        real, identity = pixels[:, :SEQUENCE], pixels[:, SEQUENCE]
        generated = model(None, mel, identity).images
        reconstruction = (generated - real).abs().mean()
        loss = reconstruction
        losses = {"rec": reconstruction.item()}
        adversarial = step >= self.adv_start
        if adversarial and self.lambda_image:
            image = critic_loss(image_d(generated.flatten(0, 1)), True)
            loss = loss + self.lambda_image * image
            losses["image"] = image.item()
        if adversarial and self.lambda_video:
            video = critic_loss(video_d(generated), True)
            loss = loss + self.lambda_video * video
            losses["video"] = video.item()
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        losses["total_g"] = loss.item()
        fake = generated.detach()
        for name, critic, weight, real_in, fake_in in (
                ("image", image_d, self.lambda_image, real.flatten(0, 1), fake.flatten(0, 1)),
                ("video", video_d, self.lambda_video, real, fake)):
            if adversarial and weight:
                judged = critic_loss(critic(real_in), True) + critic_loss(critic(fake_in), False)
                optimizers[name].zero_grad(set_to_none=True)
                judged.backward()
                optimizers[name].step()
                losses[f"d_{name}"] = judged.item()
        return losses

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)
