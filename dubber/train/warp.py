"""Differentiable resampling of crops through pixel affines: a loss that judges generated crops in
another crop's view (the sync expert's face, the lip reader's lips) needs gradients through the
warp, which cv2's has not. Pixel conventions are dubber.face.align's: a 2 x 3 affine maps pixel
centres (x, y) of one image to another's.
"""

import torch
import torch.nn.functional as F


def resample(images: torch.Tensor, source_from_target: torch.Tensor, rows: torch.Tensor,
             columns: torch.Tensor) -> torch.Tensor:
    """images [N, C, S, S] -> [N, C, len(rows), len(columns)]: the target view's pixels at the
    given row and column coordinates (target pixels), bilinear, borders repeated, each sample
    through its affine source_from_target [N, 2, 3] (target pixel -> source pixel)."""
    size = images.shape[-1]
    ys, xs = torch.meshgrid(rows.to(images), columns.to(images), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [H, W, 3]
    in_source = torch.einsum("hwk,nck->nhwc", points, source_from_target.to(images.dtype))  # [N, H, W, 2]
    grid = (2 * in_source + 1) / size - 1  # pixel centres -> grid_sample's [-1, 1] (align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resample_crop(images: torch.Tensor, source_from_target: torch.Tensor, size: int) -> torch.Tensor:
    """images [N, C, S, S] -> the whole size x size target crop [N, C, size, size] (see resample)."""
    pixels = torch.arange(size, device=images.device)
    return resample(images, source_from_target, pixels, pixels)
