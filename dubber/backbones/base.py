"""The temporal backbone contract: what every generator declares and the one call the runner makes.

A backbone turns windows of aligned face crops plus their audio into new crops. It declares:

- crop: how its crops are cut (dubber.face.crops.CropSpec);
- mel_width: mel frames in each frame's audio window (dubber.audio.MEL_WINDOW = 0.2 s);
- window / overlap: frames per call (1 for frame models like DCK, 16 for Glance) and how many
  frames consecutive windows share (the runner cross-fades them, dubber.apply);
- stateful: whether it carries state (a recurrent state, the previous output) from one window to
  the next; the runner passes it back in and resets it at every gap in the face track;
- conditioning: which identity image it takes and how it is chosen (dubber.conditioning), never
  the frame being generated: its mouth speaks the original words;
- returns_alpha: whether its output carries an α mask (already applied to the images);
- returns_points: whether it returns mouth shapes instead of images (a two-stage backbone,
  dubber.backbones.rewrite): the pipeline renders them from the video's own mouths (dubber.mouthbank);
  they are a deviation from the person's mean mouth, about each frame's centroid (points_centred)
  or where the lips are in the crop.

forward(faces [B, T, 3, S, S], mels [B, T, 1, 80, W], identity [B, 3, S, S] or None, state)
-> Generated(images [B, T, 3, S, S], alpha [B, T, 1, S, S] or None, state). Images RGB in [0, 1];
a returns_points backbone gives points [B, T, 20, 2] (crop pixels) and no images.
"""

from typing import Any, ClassVar, NamedTuple, Optional

import torch

from dubber.audio import MEL_WINDOW
from dubber.checkpoint import SelfDescribing
from dubber.face.crops import CROP_FACE, CropSpec

# Conditioning strategies (implemented in dubber.conditioning).
CONDITION_NONE = "none"  # no identity input
CONDITION_CLOSED_MOUTH = "closed_mouth"  # one frame per video: the most closed mouth in a typical pose
CONDITION_FIRST_FACE = "first_face"  # the first frame with a face (a photo's only frame)
CONDITIONINGS = (CONDITION_NONE, CONDITION_CLOSED_MOUTH, CONDITION_FIRST_FACE)


class Generated(NamedTuple):
    """Backbone output: images [B, T, 3, S, S] RGB in [0, 1]; alpha [B, T, 1, S, S] or None;
    state: what to pass to the next window's call (None for stateless backbones); points
    [B, T, 20, 2] mouth shapes of a returns_points backbone (images None)."""

    images: Optional[torch.Tensor]
    alpha: Optional[torch.Tensor] = None
    state: Any = None
    points: Optional[torch.Tensor] = None


class Backbone(SelfDescribing):
    """Base class of the generators. Subclasses set the class attributes and implement forward()."""

    name: ClassVar[str] = ""
    crop: ClassVar[CropSpec] = CropSpec(CROP_FACE, 128)
    mel_width: ClassVar[int] = MEL_WINDOW
    window: ClassVar[int] = 1
    overlap: ClassVar[int] = 0
    stateful: ClassVar[bool] = False
    conditioning: ClassVar[str] = CONDITION_CLOSED_MOUTH
    returns_alpha: ClassVar[bool] = False
    returns_points: ClassVar[bool] = False
    points_centred: bool = True
    needs_weights: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not 0 <= cls.overlap < cls.window:
            raise TypeError(f"{cls.__name__}: overlap must be in [0, window), got {cls.overlap} of {cls.window}")
        if cls.conditioning not in CONDITIONINGS:
            raise TypeError(f"{cls.__name__}: unknown conditioning {cls.conditioning!r}")

    def forward(self, faces: torch.Tensor, mels: torch.Tensor, identity: Optional[torch.Tensor] = None,
                state: Any = None) -> Generated:
        raise NotImplementedError
