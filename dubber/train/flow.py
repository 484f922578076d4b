"""Differentiable optical flow for training losses: dense Lucas-Kanade (Lucas and Kanade, 1981).

Glance's correlation loss and its discriminator's motion stream need the flow of *generated* frames
with gradients back to the generator (the paper uses FlowNet). A classical estimator written in
torch ops is differentiable as it stands and needs no training or pre-trained weights: per pixel,
the least-squares motion of the brightness constancy equation Ix u + Iy v + It = 0 over a
WINDOW x WINDOW neighbourhood, with a small ridge (RIDGE) where the neighbourhood has no texture.
One scale, at FLOW_SIZE pixels: lips move a pixel or two a frame there, inside the method's range.
"""

import torch
import torch.nn.functional as F

from dubber import media

FLOW_SIZE = 32  # pixels: frames are averaged down to this side first (64 -> 32 for Glance's lips)
WINDOW = 5  # pixels: the least-squares neighbourhood
RIDGE = 1e-4  # added to the structure tensor's diagonal (intensities in [0, 1], sums are means): flat regions give ~0 flow


def grey(frames: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB -> [..., 1, H, W]."""
    weights = frames.new_tensor(media.LUMA).view(3, 1, 1)
    return (frames * weights).sum(dim=-3, keepdim=True)


def lucas_kanade(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow from first to second: grey images [N, 1, H, W] -> [N, 2, H, W] (u, v) in pixels."""
    kx = first.new_tensor([[-0.5, 0.0, 0.5]]).view(1, 1, 1, 3)
    mean = 0.5 * (first + second)  # gradients of the mean image: symmetric in the two frames
    padded_x, padded_y = F.pad(mean, (1, 1, 0, 0), mode="replicate"), F.pad(mean, (0, 0, 1, 1), mode="replicate")
    ix, iy = F.conv2d(padded_x, kx), F.conv2d(padded_y, kx.transpose(2, 3))
    it = second - first

    def box(x):
        return F.avg_pool2d(x, WINDOW, 1, WINDOW // 2, count_include_pad=False)

    sxx, syy, sxy = box(ix * ix) + RIDGE, box(iy * iy) + RIDGE, box(ix * iy)
    sxt, syt = box(ix * it), box(iy * it)
    det = sxx * syy - sxy * sxy  # > 0: RIDGE makes the 2x2 system positive definite
    u = (-syy * sxt + sxy * syt) / det
    v = (sxy * sxt - sxx * syt) / det
    return torch.cat([u, v], dim=1)


def clip_flow(clips: torch.Tensor, size: int = FLOW_SIZE) -> torch.Tensor:
    """Flow between consecutive frames: clips [B, T, 3, H, W] in [0, 1] -> [B, 2, T-1, size, size]."""
    batch, frames = clips.shape[:2]
    images = grey(clips.flatten(0, 1))
    if images.shape[-1] != size:
        images = F.adaptive_avg_pool2d(images, size)
    images = images.view(batch, frames, 1, size, size)
    flow = lucas_kanade(images[:, :-1].flatten(0, 1), images[:, 1:].flatten(0, 1))
    return flow.view(batch, frames - 1, 2, size, size).transpose(1, 2)
