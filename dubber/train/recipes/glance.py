"""Recipe for Glance (dubber.backbones.glance): the paper's four losses (Chen et al. 2018, Eq. 2),

    L = corr_weight * l_corr + lambda_pix * l_pix + lambda_perc * l_perc + lambda_gen * l_gen,

with 1, 0.5, 1, 1 as in the paper, and Adam 2e-4, weight decay 4e-4, betas (0.5, 0.999).

A sample is WINDOW consecutive lip crops of one clip, their mel windows, and one lip image of the
same clip from outside the window (the paper: a random frame of the same video; outside the window,
so the answer is never the input; at inference one closed-mouth frame per video).

- l_corr, audio-visual derivative correlation (Eq. 1): 1 - cos(phi_s(f_s'), phi_v(flow(v_hat))),
  centred over time by default (CORR_CENTRED says why),
  f_s' the frame-to-frame change of the generator's audio features, flow the differentiable
  Lucas-Kanade flow of the generated frames (dubber.train.flow; the paper differentiates through
  FlowNet). phi_s and phi_v (CorrelationNets) keep the time axis, receptive fields 9 and 13 frames
  as in the paper, and train with the generator.
- l_pix: mean absolute error to the real clip.
- l_perc: squared error between the features of real and generated frames under the encoder of a
  lip autoencoder (dubber.train.perceptual.Autoencoder: convolutions and six residual blocks, as in the paper's 4.1)
  trained here on real lip frames. The paper trains it first and then freezes it; here it trains
  on the real frames of the first ae_steps steps (alongside the generator, which uses no
  perceptual loss meanwhile) and is frozen after, so one `dubber train` run does both.
- l_gen: -log D(audio, v_hat) under the three-stream discriminator (dubber.train.discriminators:
  audio, video and optical-flow streams), trained with the mismatch strategy (Eq. 4): real clip
  with its audio -> real; generated clip (weight mismatch_fake, the paper's lambda_p = 0.5) and a
  real clip of another sample with this audio (weight mismatch_real, lambda_u = 0.5) -> fake.

Ablation switches (the paper's Table 2): corr_weight=0 (no correlation loss, its (d)/(h));
flow_stream=false (two-stream discriminator, its (g)/(h)). Identity-balanced sampling and the
corrected audio-visual offsets come from dubber.train.sampler and dubber.data.
"""

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dubber.backbones.blocks import LEAKY_SLOPE
from dubber.backbones.glance import AUDIO_CHANNELS, SIZE, WINDOW, Glance
from dubber.face.crops import CROP_LIPS, CropSpec
from dubber.train import distributed
from dubber.train.augment import Jitter, augment, to_float
from dubber.train.discriminators import ThreeStreamDiscriminator, critic_loss
from dubber.train.flow import clip_flow
from dubber.train.perceptual import Autoencoder
from dubber.train.recipes import Recipe, recipe
from dubber.train.validate import generator_figures

BATCH_SIZE = 8  # clips of WINDOW frames a step (the paper does not say; one CPU thread: ~3 s a step)
LEARNING_RATE = 2e-4  # paper, Sec. 5.1
WEIGHT_DECAY = 4e-4  # paper, Sec. 5.1 (Adam's L2 term)
ADAM_BETAS = (0.5, 0.999)  # paper, Sec. 5.1
CORR_WEIGHT, LAMBDA_PIX, LAMBDA_PERC, LAMBDA_GEN = 1.0, 0.5, 1.0, 1.0  # paper, Eq. 2
MISMATCH_FAKE, MISMATCH_REAL = 0.5, 0.5  # lambda_p, lambda_u of Eq. 4
AE_STEPS = 500  # steps the perceptual autoencoder trains on real frames before it is frozen and used
IDENTITY_GAP = 8  # a clip needs this many frames outside a window to draw the identity image from
COLOUR_JITTER = 0.08  # brightness shift, contrast and saturation factors within +-8 %
EPSILON = 1e-8  # added to the cosine's denominator (paper, Sec. 3.2)

# Eq. 1 as printed is met by phi_s and phi_v that output one constant direction (the paper says
# the other losses prevent that; here the uncentred loss fell from 0.95 to 0.01 in 100 steps of
# the CPU run, teaching the generator nothing). Centred over time, a constant output has no
# correlation to give: only frame-to-frame variation that agrees between sound and motion counts.
CORR_CENTRED = True
CORR_WIDTH = 32  # channels of phi_s and phi_v's outputs (one vector a frame step)


class CorrelationNets(nn.Module):
    """phi_s and phi_v of the correlation loss (paper, Sec. 3.2).

    forward(audio_change [B, Ca, T-1, F], flow [B, 2, T-1, s, s]) -> loss [] = mean over the batch of
    1 - cos(phi_s(audio_change), phi_v(flow)), both flattened from [B, CORR_WIDTH, T-1], each
    channel centred over time first (`centred`, the default; see CORR_CENTRED). Neither
    mixes frames beyond its receptive field (phi_s: four 3-frame layers, 9 frames; phi_v: 5, 5, 3,
    3, 13 frames, the paper's figures): the delay between lips and sound is learnt, not fixed.
    Padding repeats the edge frames: zeros would mark the first and last frames, a time profile
    both outputs could share whatever the clip, which the centred cosine would count as correlation.
    """

    def __init__(self, audio_channels: int = AUDIO_CHANNELS, width: int = CORR_WIDTH):
        super().__init__()
        layers, channels = [], audio_channels
        for index in range(4):  # frequency 8 -> 4 -> 2 -> 1 -> 1; time kept
            layers += [nn.Conv2d(channels, width, 3, (1, 2 if index < 3 else 1), 1, padding_mode="replicate"),
                       nn.LeakyReLU(LEAKY_SLOPE, True)]
            channels = width
        self.phi_s = nn.Sequential(*layers[:-1])
        layers, channels = [], 2
        for time_kernel in (5, 5, 3, 3):  # space 32 -> 16 -> 8 -> 4 -> 2; time kept
            layers += [nn.Conv3d(channels, width, (time_kernel, 3, 3), (1, 2, 2), (time_kernel // 2, 1, 1),
                                 padding_mode="replicate"),
                       nn.LeakyReLU(LEAKY_SLOPE, True)]
            channels = width
        self.phi_v = nn.Sequential(*layers[:-1])

    def forward(self, audio_change: torch.Tensor, flow: torch.Tensor, centred: bool = True) -> torch.Tensor:
        audio = self.phi_s(audio_change).mean(dim=3)  # [B, width, T-1]
        visual = self.phi_v(flow).mean(dim=(3, 4))
        if centred:  # each channel's mean over time removed: Pearson's r, as in the paper's Fig. 4 study
            audio, visual = audio - audio.mean(2, keepdim=True), visual - visual.mean(2, keepdim=True)
        audio, visual = audio.flatten(1), visual.flatten(1)
        cosine = (audio * visual).sum(1) / (audio.norm(dim=1) * visual.norm(dim=1) + EPSILON)
        return (1 - cosine).mean()


class _Generating(nn.Module):
    """The generator as the step calls it: forward(mels, identity) -> (clips [B, T, 3, S, S],
    audio features f_s [B, Ca, T, F]), one forward() for DistributedDataParallel."""

    def __init__(self, model: Glance):
        super().__init__()
        self.model = model

    def forward(self, mels: torch.Tensor, identity: torch.Tensor):
        audio = self.model.audio_features(mels)
        return self.model.generate(audio, identity), audio


@recipe
class GlanceRecipe(Recipe):
    model = "glance"
    identity_power = 0.0
    select_metric = "val_lmd"

    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    adam_betas: Tuple[float, float] = ADAM_BETAS
    corr_weight: float = CORR_WEIGHT  # 0: the ablation without the correlation loss
    corr_centred: bool = CORR_CENTRED  # False: Eq. 1 exactly as printed
    lambda_pix: float = LAMBDA_PIX
    lambda_perc: float = LAMBDA_PERC
    lambda_gen: float = LAMBDA_GEN
    mismatch_fake: float = MISMATCH_FAKE
    mismatch_real: float = MISMATCH_REAL
    flow_stream: bool = True  # False: the two-stream discriminator (audio, video) of the ablation
    ae_steps: int = AE_STEPS
    colour_jitter: float = COLOUR_JITTER
    init: str = ""  # path of a glance file to start from instead of a fresh model

    def crops(self) -> Sequence[CropSpec]:
        return [CropSpec(CROP_LIPS, SIZE)]

    def build(self) -> Dict[str, nn.Module]:
        return {"model": self.initialised(Glance(), self.init), "corr": CorrelationNets(),
                "disc": ThreeStreamDiscriminator(self.flow_stream), "ae": Autoencoder()}

    def optimizers(self, modules):
        def adam(*names):
            parameters = [p for name in names for p in modules[name].parameters()]
            return torch.optim.Adam(parameters, lr=self.lr, betas=tuple(self.adam_betas), weight_decay=self.weight_decay)

        return {"g": adam("model", "corr"), "d": adam("disc"), "ae": adam("ae")}

    def trained(self, modules):
        return {**modules, "model": _Generating(modules["model"])}

    def anchors(self, clip: dict) -> np.ndarray:
        frames = len(clip["mels"])
        return np.arange(frames - WINDOW + 1) if frames >= WINDOW + IDENTITY_GAP else np.zeros(0, int)

    def draw(self, sampler, rng: np.random.Generator):
        """-> lips uint8 RGB [N, WINDOW + 1, S, S, 3] (the window's frames, then the identity
        image), mels [N, WINDOW, 80, W]; N the step's batch over all processes."""
        key = CropSpec(CROP_LIPS, SIZE).key
        images, mels = [], []
        for _ in range(self.batch_size * distributed.world_size()):
            index, start = sampler.draw(rng)
            clip = sampler.clips[index]
            crops = clip["crops"][key]
            outside = np.concatenate([np.arange(start), np.arange(start + WINDOW, len(crops))])
            identity = int(outside[rng.integers(outside.size)])
            images.append(np.concatenate([crops[start:start + WINDOW], crops[identity:identity + 1]]))
            mels.append(clip["mels"][start:start + WINDOW])
        return np.stack(images), np.stack(mels)

    def train_step(self, modules, optimizers, sampler, rng, step, device):
        if self.batch_size < 2:
            raise ValueError("the mismatch strategy needs a batch of at least 2 clips")
        generator, corr, disc, ae = modules["model"], modules["corr"], modules["disc"], modules["ae"]
        images, mels = self.draw(sampler, rng)
        jitter = Jitter(self.colour_jitter, self.colour_jitter, self.colour_jitter)
        pixels, _ = augment(to_float(images, device), rng, jitter)  # the flip and jitter of the audio's own clip
        pixels = distributed.shard(pixels)
        mel = torch.from_numpy(distributed.shard(mels)).to(device).float().unsqueeze(2)  # [B, T, 1, 80, W]
        real, identity = pixels[:, :WINDOW], pixels[:, WINDOW]
        mismatched = real.roll(1, dims=0)  # another sample's real clip: k != j
        losses = {}

        # The autoencoder: trains on real frames, then is frozen and gives the perceptual features.
        learning = step < self.ae_steps
        ae.train(learning).requires_grad_(learning)
        if learning:
            losses["ae"] = ae.train_on(real.flatten(0, 1), optimizers["ae"])

        generated, audio = generator(mel, identity)
        with torch.no_grad():
            real_flow = clip_flow(real)
            mismatched_flow = real_flow.roll(1, dims=0)
        fake_flow = clip_flow(generated)
        pix = (generated - real).abs().mean()
        loss = self.lambda_pix * pix
        losses["pix"] = pix.item()
        if self.corr_weight:
            correlation = corr(audio[:, :, 1:] - audio[:, :, :-1], fake_flow, self.corr_centred)
            loss = loss + self.corr_weight * correlation
            losses["corr"] = correlation.item()
        if not learning and self.lambda_perc:
            perceptual = ae.distance(generated.flatten(0, 1), real.flatten(0, 1))
            loss = loss + self.lambda_perc * perceptual
            losses["perc"] = perceptual.item()
        flows = self.flow_stream
        if self.lambda_gen:
            gen = critic_loss(disc(mel, generated, fake_flow if flows else None), True)
            loss = loss + self.lambda_gen * gen
            losses["gen"] = gen.item()
        optimizers["g"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["g"].step()
        losses["total_g"] = loss.item()

        if self.lambda_gen:
            dis = (critic_loss(disc(mel, real, real_flow if flows else None), True)
                   + self.mismatch_fake * critic_loss(disc(mel, generated.detach(), fake_flow.detach() if flows else None), False)
                   + self.mismatch_real * critic_loss(disc(mel, mismatched, mismatched_flow if flows else None), False))
            optimizers["d"].zero_grad(set_to_none=True)
            dis.backward()
            optimizers["d"].step()
            losses["dis"] = dis.item()
        return losses

    def validate(self, modules, clips, device):
        return generator_figures(modules["model"], clips, device)

