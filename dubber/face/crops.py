"""What a crop is: its kind and size. Owned by face/, declared by backbones, cut by face.align.

Three kinds, all cut through one similarity transform per frame (dubber.face.align):
CROP_FACE, the RSA-aligned full face (in-plane rotation removed); CROP_LIPS, the same alignment
around the mouth only; CROP_BOX, an upright face box (scale and translation only), which pastes
straight back without resampling the rotation.
"""

from dataclasses import dataclass

CROP_FACE = "face"
CROP_LIPS = "lips"
CROP_BOX = "box"
CROP_KINDS = (CROP_FACE, CROP_LIPS, CROP_BOX)
MIN_CROP_SIZE, MAX_CROP_SIZE = 16, 1024  # pixels


@dataclass(frozen=True)
class CropSpec:
    """kind: one of CROP_KINDS; size: side of the square crop in pixels."""

    kind: str
    size: int

    def __post_init__(self):
        if self.kind not in CROP_KINDS:
            raise ValueError(f"unknown crop kind {self.kind!r}; choose one of {', '.join(CROP_KINDS)}")
        if not MIN_CROP_SIZE <= int(self.size) <= MAX_CROP_SIZE:
            raise ValueError(f"crop size must be {MIN_CROP_SIZE}-{MAX_CROP_SIZE} pixels, got {self.size}")

    @property
    def key(self) -> str:
        """Name of this crop in a preprocess cache: 'face96', 'box128', ..."""
        return f"{self.kind}{self.size}"

    @classmethod
    def parse(cls, text: str) -> "CropSpec":
        """'face:96' -> CropSpec('face', 96); ValueError saying what is allowed otherwise."""
        kind, _, size = text.partition(":")
        if kind not in CROP_KINDS or not size.isdigit():
            raise ValueError(f"crop must be {'|'.join(CROP_KINDS)}:SIZE (e.g. face:96), got {text!r}")
        return cls(kind, int(size))

    def __str__(self) -> str:
        return f"{self.kind}:{self.size}"
