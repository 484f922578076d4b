"""What every backbone declares and the one call the pipeline makes.

A backbone is an nn.Module that turns aligned face crops plus per-frame audio windows into new
crops. It declares how its crops are cut (CropSpec), how wide its audio window is, and whether it
needs a reference frame or returns an alpha mask (DCK); the pipeline does the rest.
"""

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import nn

from dubber.face.crops import CROP_BOX, CROP_FACE, CROP_LIPS, CropSpec  # noqa: F401 (re-exported)

class Generated(NamedTuple):
    """Backbone output: images [B, 3, S, S] RGB in [0, 1]; alpha [B, 1, S, S] in [0, 1] or None."""

    images: torch.Tensor
    alpha: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """Base class. Subclasses set the class attributes and implement forward().

    forward(faces [B,3,S,S] in [0,1], mels [B,1,80,mel_width], references [B,3,S,S] or None)
    -> Generated.  References are another frame of the same face (the pipeline gives one per
    video, a closed mouth: pipeline.reference_frame). `init_kwargs` is what the checkpoint stores.
    """

    name: ClassVar[str] = ""
    crop: ClassVar[CropSpec] = CropSpec(CROP_FACE, 128)
    mel_width: ClassVar[int] = 16  # mel frames per video frame window (16 = 0.2 s)
    needs_reference: ClassVar[bool] = False
    returns_alpha: ClassVar[bool] = False
    needs_weights: ClassVar[bool] = True

    def __init__(self, **init_kwargs):
        super().__init__()
        self.init_kwargs = init_kwargs
        self.meta: dict = {}

    def forward(self, faces: torch.Tensor, mels: torch.Tensor,
                references: Optional[torch.Tensor] = None) -> Generated:
        raise NotImplementedError
