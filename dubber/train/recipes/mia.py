"""Recipes of MIA and AMIE (dubber.backbones.mia): the papers' objective (MIA Eq. 13),

    L = L_GAN + lambda_1 L_perc + lambda_2 L_mouth + lambda_3 L_mi  (+ lambda_frame L_frame, below),

Adam 2e-4 (papers, Sec. 4) with beta1 0.5 (the usual GAN setting; the papers do not say). The
papers give no lambda values; ours are the constants below.

A sample is SEQUENCE consecutive frames of one clip, their mel windows and an identity face from the
same clip at least IDENTITY_GAP frames from them (never a frame being generated: it would hand the
model the answer's mouth). The generator runs along the frames feeding back its own previous frame
(the first from the identity face), as at inference.

- L_GAN: the frame discriminator (dubber.train.discriminators.PairCritic) on (frame, audio) pairs:
  real with its own audio -> matched; generated, and real with another sample's audio ->
  not (weights 1, MISMATCH_WEIGHT, MISMATCH_WEIGHT). From adv_start steps on.
- L_perc: squared distance of features under an autoencoder of real faces trained here
  (dubber.train.perceptual) on the first ae_steps steps, then frozen; the papers use a pretrained
  network, which cannot be had here.
- L_mouth: L1 over each target's mouth box (dlib's 20 mouth points, grown by MOUTH_BOX_MARGIN).
- L_frame (not in the papers): L1 over the whole frame. A small autoencoder trained for minutes
  is a weaker perceptual judge than VGG; without it the colours drift before it is trained.
- L_mi = -I(generated frame; audio) under the network T (another PairCritic), estimator by
  `estimator`: "asymmetric" (the papers' MIA/AMIE: T is trained on REAL frames with their audio
  against another sample's audio, with the Jensen-Shannon bound in softplus form, Eq. 7; the
  generator maximises T's estimate on its generated pairs), "mine" (plain MINE, the ablation: the
  Donsker-Varadhan bound, T trained on the generated pairs themselves) or "none".
- Dynamic attention (papers, Sec. 3.2; training only): the identity face's mouth area is scaled
  by a rate that falls from ATTENTION_START to ATTENTION_LOW over attention_low_at steps (the
  generator must take the mouth from the audio and the previous frame), then is 1 from
  attention_full_at on (as at inference). `attention`: "box" (MIA: the mouth box), "outline"
  (AMIE's finer mask: the lips' own outline, feathered -- the paper predicts it frame by frame
  from the previous mask and the generated face; the landmarks give it here) or "none" (the ablation).
"""

from typing import ClassVar, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dubber.backbones.mia import AMIE, MIA, SIZE
from dubber.errors import DubberError
from dubber.face.align import transform_points
from dubber.face.crops import CROP_BOX, CropSpec
from dubber.face.landmarks import MOUTH
from dubber.train import distributed
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.discriminators import PairCritic, critic_loss
from dubber.train.perceptual import Autoencoder
from dubber.train.recipes import Recipe, recipe
from dubber.train.sampler import distant_frame, sequence_anchors
from dubber.train.validate import generator_figures

BATCH_SIZE = 8  # sequences a step
SEQUENCE = 3  # frames a sample: the generator feeds back its previous frame twice
LEARNING_RATE = 2e-4  # papers, Sec. 4
ADAM_BETAS = (0.5, 0.999)
LAMBDA_GAN = 1.0
LAMBDA_PERC = 1.0
LAMBDA_MOUTH = 10.0
LAMBDA_FRAME = 5.0
LAMBDA_MI = 0.1
ADV_START = 1000  # steps before the discriminator's and T's losses reach the generator (a blurry start only adds noise)
MISMATCH_WEIGHT = 0.5
AE_STEPS = 500  # steps the perceptual autoencoder trains on real faces before it is frozen and used
ATTENTION_START, ATTENTION_LOW = 0.8, 0.2  # papers: "0.7 ~ 0.9" down to "0.1 ~ 0.3"
ATTENTION_LOW_AT = 3000  # steps over which the rate falls
ATTENTION_FULL_AT = 6000  # steps from which the rate is 1 (papers: "the last few epochs")
MOUTH_BOX_MARGIN = 3  # pixels round the mouth box at 128 px (the papers: 5 at 256)
OUTLINE_FEATHER = 3.0  # pixels (sigma) of AMIE's outline mask
IDENTITY_GAP = 5  # frames at least between the identity face and any frame of the sequence
COLOUR_JITTER = 0.08


def attention_rate(step: int, low_at: int = ATTENTION_LOW_AT, full_at: int = ATTENTION_FULL_AT) -> float:
    """The dynamic attention's rate on the identity's mouth area at `step` (1: no attention)."""
    if step >= full_at:
        return 1.0
    return ATTENTION_START + (ATTENTION_LOW - ATTENTION_START) * min(step / max(low_at, 1), 1.0)


def mouth_region(points: np.ndarray, size: int, kind: str) -> np.ndarray:
    """The mouth area of a crop in [0, 1]: float32 [S, S] from its 20 mouth points [20, 2] (crop
    pixels); kind "box" (the points' box grown by MOUTH_BOX_MARGIN) or "outline" (their hull, feathered)."""
    import cv2

    region = np.zeros((size, size), np.float32)
    if kind == "box":
        x0, y0 = np.floor(points.min(0) - MOUTH_BOX_MARGIN).astype(int).clip(0, size)
        x1, y1 = np.ceil(points.max(0) + MOUTH_BOX_MARGIN + 1).astype(int).clip(0, size)
        region[y0:y1, x0:x1] = 1
        return region
    cv2.fillConvexPoly(region, cv2.convexHull(np.round(points).astype(np.int32)), 1.0)
    return np.clip(cv2.GaussianBlur(region, (0, 0), OUTLINE_FEATHER) * 2, 0, 1)


def js_estimate(joint: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon lower bound of mutual information (papers' Eq. 7) from T's scores on matched
    and mismatched pairs."""
    return (-F.softplus(-joint)).mean() - F.softplus(marginal).mean()


def dv_estimate(joint: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan lower bound (MINE): E[T] - log E[exp T]."""
    return joint.mean() - (torch.logsumexp(marginal, 0) - np.log(len(marginal)))


@recipe
class MIARecipe(Recipe):
    model = "mia"
    identity_power = 0.0
    select_metric = "val_lmd"
    estimators: ClassVar[Tuple[str, ...]] = ("asymmetric", "mine", "none")
    attentions: ClassVar[Tuple[str, ...]] = ("box", "outline", "none")

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    adam_betas: Tuple[float, float] = ADAM_BETAS
    lambda_gan: float = LAMBDA_GAN
    lambda_perc: float = LAMBDA_PERC
    lambda_mouth: float = LAMBDA_MOUTH
    lambda_frame: float = LAMBDA_FRAME
    lambda_mi: float = LAMBDA_MI
    adv_start: int = ADV_START
    mismatch_weight: float = MISMATCH_WEIGHT
    ae_steps: int = AE_STEPS
    estimator: str = "asymmetric"
    attention: str = "box"
    attention_low_at: int = ATTENTION_LOW_AT
    attention_full_at: int = ATTENTION_FULL_AT
    colour_jitter: float = COLOUR_JITTER
    init: str = ""  # path of a file of this model to start from instead of a fresh one

    def __post_init__(self):
        if self.batch_size < 2:
            raise DubberError(f"batch_size must be at least 2 (mismatched pairs pair one sample with another's "
                              f"audio), got {self.batch_size}")
        if self.estimator not in self.estimators:
            raise DubberError(f"estimator must be one of {', '.join(self.estimators)}, got {self.estimator!r}")
        if self.attention not in self.attentions:
            raise DubberError(f"attention must be one of {', '.join(self.attentions)}, got {self.attention!r}")

    @property
    def spec(self) -> CropSpec:
        return CropSpec(CROP_BOX, SIZE)

    def crops(self) -> Sequence[CropSpec]:
        return [self.spec]

    def generator(self) -> MIA:
        return MIA()

    def build(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.initialised(self.generator(), self.init), "disc": PairCritic(),
                "mi": PairCritic(), "ae": Autoencoder()}

    def optimizers(self, modules):
        return {name: torch.optim.Adam(modules[name].parameters(), lr=self.lr, betas=tuple(self.adam_betas))
                for name in ("model", "disc", "mi", "ae")}

    def anchors(self, clip: dict) -> np.ndarray:
        return sequence_anchors(len(clip["mels"]), SEQUENCE, IDENTITY_GAP)

    def draw(self, sampler, rng: np.random.Generator):
        """-> images uint8 RGB [N, SEQUENCE + 1, S, S, 3] (the frames, then the identity face), mels
        [N, SEQUENCE, 80, W], mouth areas float32 [N, SEQUENCE + 1, S, S] (targets: boxes for L_mouth;
        identity: the attention's kind); N the step's batch over all processes."""
        key, size = self.spec.key, self.spec.size
        images, mels, regions = [], [], []
        for _ in range(self.batch_size * distributed.world_size()):
            index, start = sampler.draw(rng)
            clip = sampler.clips[index]
            crops = clip["crops"][key]
            identity = distant_frame(len(crops), start, SEQUENCE, IDENTITY_GAP, rng)
            frames = list(range(start, start + SEQUENCE)) + [identity]
            images.append(crops[frames])
            mels.append(clip["mels"][start:start + SEQUENCE])
            points = [transform_points(clip["landmarks"][t][MOUTH], clip["transforms"][key][t]) for t in frames]
            kinds = ["box"] * SEQUENCE + ["box" if self.attention == "none" else self.attention]
            regions.append(np.stack([mouth_region(p, size, kind) for p, kind in zip(points, kinds)]))
        return np.stack(images), np.stack(mels), np.stack(regions)

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        model, disc, mi, ae = modules["model"], modules["disc"], modules["mi"], modules["ae"]
        images, mels, regions = self.draw(sampler, rng)
        jitter = Jitter(self.colour_jitter, self.colour_jitter, self.colour_jitter)
        pixels, flipped = augment(to_float(images, device), rng, jitter)
        regions = torch.from_numpy(regions).to(device)
        regions = torch.where(flipped.view(-1, 1, 1, 1), regions.flip(-1), regions)
        pixels, regions = distributed.shard(pixels), distributed.shard(regions)
        mel = torch.from_numpy(distributed.shard(mels)).to(device).float().unsqueeze(2)  # [B, T, 1, 80, W]
        real, identity = pixels[:, :SEQUENCE], pixels[:, SEQUENCE]
        losses = {}

        learning = step < self.ae_steps  # the perceptual autoencoder: real faces, then frozen
        ae.train(learning).requires_grad_(learning)
        if learning:
            losses["ae"] = ae.train_on(real.flatten(0, 1), optimizers["ae"])

        rate = attention_rate(step, self.attention_low_at, self.attention_full_at) if self.attention != "none" else 1.0
        attention = 1 - (1 - rate) * regions[:, SEQUENCE, None]
        generated = model(None, mel, identity, attention=attention).images  # [B, T, 3, S, S]
        fake, target = generated.flatten(0, 1), real.flatten(0, 1)
        audio, other = mel.flatten(0, 1), mel.roll(1, dims=0).flatten(0, 1)  # another sample's audio
        box = regions[:, :SEQUENCE].flatten(0, 1)[:, None]
        error = (fake - target).abs()
        mouth = (error * box).sum() / (box.sum() * 3 + 1e-6)
        frame = error.mean()
        loss = self.lambda_mouth * mouth + self.lambda_frame * frame
        losses.update(mouth=mouth.item(), frame=frame.item(), rate=rate)
        if not learning and self.lambda_perc:
            perceptual = ae.distance(fake, target)
            loss = loss + self.lambda_perc * perceptual
            losses["perc"] = perceptual.item()
        adversarial = step >= self.adv_start
        if adversarial and self.lambda_gan:
            gan = critic_loss(disc(fake, audio), True)
            loss = loss + self.lambda_gan * gan
            losses["gan"] = gan.item()
        if adversarial and self.estimator != "none" and self.lambda_mi:
            bound = js_estimate if self.estimator == "asymmetric" else dv_estimate
            information = bound(mi(fake, audio), mi(fake, other))
            loss = loss - self.lambda_mi * information
            losses["mi_generated"] = information.item()
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        losses["total_g"] = loss.item()

        if adversarial and self.lambda_gan:
            still = fake.detach()
            dis = (critic_loss(disc(target, audio), True) + self.mismatch_weight * critic_loss(disc(still, audio), False)
                   + self.mismatch_weight * critic_loss(disc(target, other), False))
            optimizers["disc"].zero_grad(set_to_none=True)
            dis.backward()
            optimizers["disc"].step()
            losses["dis"] = dis.item()
        if self.estimator != "none" and self.lambda_mi:
            # T learns from the step's first pairs on: "asymmetric" from real frames, "mine" from
            # the generated ones; maximising its bound is minimising the negative.
            frames = target if self.estimator == "asymmetric" else fake.detach()
            bound = js_estimate if self.estimator == "asymmetric" else dv_estimate
            estimate = bound(mi(frames, audio), mi(frames, other))
            optimizers["mi"].zero_grad(set_to_none=True)
            (-estimate).backward()
            optimizers["mi"].step()
            losses["mi_t"] = estimate.item()
        return losses

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)


@recipe
class AMIERecipe(MIARecipe):
    model = "amie"
    attention: str = "outline"

    def generator(self) -> MIA:
        return AMIE()
