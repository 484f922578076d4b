"""Recipe of CRAN (dubber.backbones.cran): the paper's objective (its Eq. 5),

    L = L_rec + lambda_I L_I + lambda_V L_V + lambda_l L_l,

with the paper's weights 1e-3, 1e-2 and 1e-3, reconstruction alone for the first adv_start steps and
then the discriminators (the paper: 30 epochs, then 15 with them), Adam 2e-4 with beta1 0.5.

A sample is SEQUENCE consecutive frames of one clip with their 350 ms audio windows, and an
identity face from the same clip at least IDENTITY_GAP frames away (never a frame being generated:
its mouth would be the answer). The recurrent unit starts from zero for each sample, as the
runner starts it at each run of frames.

- L_rec: L1 between the generated and the real frames.
- L_I: the image discriminator (dubber.train.discriminators.PatchDiscriminator) on single frames.
- L_V: the video discriminator (VideoDiscriminator, 3D convolutions) on the whole sequence: the
  smoothness between frames.
- L_l: the lip-reading discriminator D_l on GRID's aligned words, initialised from the lip reader
  trained on real mouths (weights/lipreader.pt; the paper: "initialized from a pre-trained
  lip-reading model"). Each step LIP_BATCH words of GRID clips are generated over their own frames
  (an identity face outside them), their lips cut from the generated crops by a differentiable warp
  (dubber.train.warp) as the lip reader's crops are cut, and resampled to its WORD_FRAMES. The
  generator minimises D_l's cross-entropy of the true word. D_l learns real words' labels and
  pushes generated ones off theirs: the paper's Eq. 2 subtracts the fake cross-entropy, which has
  no bound (D_l would win by making it infinite), so D_l minimises -log(1 - p(true word | fake))
  instead, the same push, bounded. The real words go through the same warp from the box crops, so
  D_l cannot tell them apart by resampling.

Loss ablation (the paper's Table 1): lambda_image / lambda_video / lambda_lip = 0 switch each
critic off (reconstruction only, + image D, + video D, + lip-reading D).
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dubber.backbones.cran import CRAN, SIZE
from dubber.backbones.lipreader import GRID_WORDS, MOUTH_CROP, WORD_FRAMES, word_frames
from dubber.errors import DubberError
from dubber.face.align import compose_affine, crop_transforms, inverse_affine
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.train import distributed, flow
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.discriminators import PatchDiscriminator, VideoDiscriminator, critic_loss
from dubber.train.recipes import Recipe, recipe
from dubber.train.sampler import distant_frame, sequence_anchors
from dubber.train.validate import generator_figures
from dubber.train.warp import resample_crop

BATCH_SIZE = 4  # sequences a step
SEQUENCE = 8  # frames a sample: enough for the video discriminator's 3D convolutions
LEARNING_RATE = 2e-4  # paper, Sec. 4.1
ADAM_BETAS = (0.5, 0.999)  # paper, Sec. 4.1
LAMBDA_IMAGE = 1e-3  # paper, Sec. 4.1
LAMBDA_VIDEO = 1e-2  # paper, Sec. 4.1
LAMBDA_LIP = 1e-3  # paper, Sec. 4.1
LIP_BATCH = 4  # words a step for the lip-reading critic (each generated over its own frames)
LONGEST_WORD = 16  # frames: longer words are not drawn (GRID's last 2-15 at 25 fps)
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
    lambda_lip: float = LAMBDA_LIP
    lip_batch: int = LIP_BATCH
    lip_reader: str = ""  # D_l's starting weights: a lipreader file ("": the shipped weights/lipreader.pt)
    adv_start: int = ADV_START
    colour_jitter: float = COLOUR_JITTER
    init: str = ""  # path of a cran file to start from instead of a fresh model

    @property
    def spec(self) -> CropSpec:
        return CropSpec(CROP_BOX, SIZE)

    def crops(self) -> Sequence[CropSpec]:
        return [self.spec]

    def build(self) -> Dict[str, torch.nn.Module]:
        modules = {"model": self.initialised(CRAN(), self.init), "image": PatchDiscriminator(),
                   "video": VideoDiscriminator()}
        if self.lambda_lip:
            from dubber.backbones import load

            modules["lip"] = load("lipreader", self.lip_reader or None).train()
        return modules

    def optimizers(self, modules):
        return {name: torch.optim.Adam(module.parameters(), lr=self.lr, betas=tuple(self.adam_betas))
                for name, module in modules.items()}

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

    def draw_words(self, sampler, rng: np.random.Generator):
        """LIP_BATCH words of the clips that carry GRID's alignments -> images uint8 RGB
        [N, L + 1, S, S, 3] (L frames that hold each word, then an identity face outside them), mels
        [N, L, 80, W], the word's WORD_FRAMES frames within the L [N, WORD_FRAMES], labels [N] (the
        lip reader's word indices) and lips-crop -> box-crop pixel affines [N, L, 2, 3]."""
        key = self.spec.key
        spoken = _drawable_words(sampler.clips)
        drawn = [spoken[k] for k in rng.integers(len(spoken), size=self.lip_batch * distributed.world_size())]
        span = max(end - first for _, first, end, _ in drawn)
        images, mels, frames, labels, box_from_lips = [], [], [], [], []
        for index, first, end, word in drawn:
            clip = sampler.clips[index]
            crops, length = clip["crops"][key], len(clip["mels"])
            start = max(0, min(first, length - span))
            identity = distant_frame(len(crops), start, span, IDENTITY_GAP, rng)
            images.append(crops[list(range(start, start + span)) + [identity]])
            mels.append(clip["mels"][start:start + span])
            frames.append(word_frames(first, end) - start)
            labels.append(GRID_WORDS.index(word))
            lips = _lips_transforms(clip)
            box_from_lips.append([compose_affine(clip["transforms"][key][t], inverse_affine(lips[t]))
                                  for t in range(start, start + span)])
        return (np.stack(images), np.stack(mels), np.stack(frames), np.array(labels),
                np.array(box_from_lips, np.float32))

    def lip_words(self, model, sampler, rng, device):
        """Generated and real words as D_l sees them, grey lips [N, WORD_FRAMES, 1, 64, 64] each, and
        their labels [N] (see draw_words); generated keeps its graph to the model."""
        images, mels, frames, labels, box_from_lips = self.draw_words(sampler, rng)
        images, mels = distributed.shard(images), distributed.shard(mels)
        frames, labels, box_from_lips = (distributed.shard(a) for a in (frames, labels, box_from_lips))
        pixels = to_float(images, device)
        mel = torch.from_numpy(mels).to(device).float().unsqueeze(2)
        generated = model(None, mel, pixels[:, -1]).images  # [B, L, 3, S, S]
        rows = torch.arange(len(frames), device=device)[:, None]
        picks = torch.from_numpy(frames).to(device)
        geometry = torch.from_numpy(box_from_lips).to(device)[rows, picks].flatten(0, 1)

        def lips(sequence: torch.Tensor) -> torch.Tensor:  # [B, L, 3, S, S] -> grey lips of the word
            warped = resample_crop(sequence[rows, picks].flatten(0, 1), geometry, MOUTH_CROP.size)
            return flow.grey(warped).view(len(frames), WORD_FRAMES, 1, *warped.shape[-2:])

        return lips(generated), lips(pixels[:, :-1]), torch.from_numpy(labels).to(device)

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
        lip_reading = adversarial and self.lambda_lip
        if lip_reading:
            fake_lips, real_lips, labels = self.lip_words(model, sampler, rng, device)
            lip = F.cross_entropy(modules["lip"](fake_lips), labels)
            loss = loss + self.lambda_lip * lip
            losses["lip"] = lip.item()
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
        if lip_reading:
            lip_d = modules["lip"]
            real_logits, fake_logits = lip_d(real_lips), lip_d(fake_lips.detach())
            fake_true = fake_logits.softmax(1).gather(1, labels[:, None])
            judged = F.cross_entropy(real_logits, labels) - torch.log1p(-fake_true.clamp(max=1 - 1e-6)).mean()
            optimizers["lip"].zero_grad(set_to_none=True)
            judged.backward()
            optimizers["lip"].step()
            losses["d_lip"] = judged.item()
        return losses

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)


def _drawable_words(clips: Sequence[dict]) -> List[Tuple[int, int, int, str]]:
    """(clip index, first frame, end frame, word) of every aligned word (GRID's) at most LONGEST_WORD
    frames long, in a clip where any span of that many frames leaves an identity face IDENTITY_GAP
    frames away (sequence_anchors has starts for it); refused when there is none."""
    spoken = [(i, first, end, word) for i, clip in enumerate(clips)
              if sequence_anchors(len(clip["mels"]), LONGEST_WORD, IDENTITY_GAP).size
              for first, end, word in clip.get("words", ()) if end - first <= LONGEST_WORD]
    if not spoken:
        raise DubberError("the lip-reading critic needs GRID clips with word alignments, in runs long enough to "
                          "draw an identity face apart from a word; none were loaded (or pass --set lambda_lip=0)")
    return spoken


def _lips_transforms(clip: dict) -> np.ndarray:
    """The lip reader's crop transforms [T, 2, 3] of a clip's frames, from its landmarks (as
    dubber.cache.derive_crops computes them for its lips crops)."""
    return crop_transforms(clip["landmarks"], MOUTH_CROP)
