"""Mouth bank: the person's own real mouths, retrieved by shape, in place of the generated texture.

The video being dubbed holds the person's real mouths, sharp and in every shape they make (the
idea of Video Rewrite, Bregler et al. 1997, and "Synthesizing Obama", Suwajanakorn et al. 2017).
`build_bank` cuts them once, in the backbone's crop space (dubber.face.align: the same transforms
the pipeline crops with), and describes each by its 20 mouth landmarks (dlib, predicted on the
crop itself so bank and generated crops are measured alike). For each generated crop,
`MouthBank.render` predicts the generated mouth's landmarks, retrieves the real mouth of the
closest shape and look (a grey thumbnail of the mouth region: teeth or a dark mouth behind the
same lips; on one held-out clip this raised mouth PSNR and sharpness and lowered flicker against
shape alone) (staying with the next frame of the previous pick when it is nearly as close, so
runs of real consecutive mouths play rather than a new mouth every frame), warps it onto the
generated mouth's landmarks (a least-squares affine) and blends it in under a feathered mask
over the lips, its change faded to zero at the mask's edge (dubber.blend.match_seam). The
pipeline then pastes the result as it pastes any generated crop. For a backbone that predicts
mouth shapes rather than pixels (dubber.backbones.rewrite), `MouthBank.render_shape` retrieves the
real crop of the closest shape and warps its mouth onto the predicted points (dubber.face.morph):
on the val_select clips this lowered LMD 1.663 -> 1.642 and raised the opening correlation 0.326
-> 0.375 against the retrieved mouth as cut.

Evaluation must never hand the bank the frames it scores: build it from another part of the
video (the pipeline's `mouth_bank_source`) or exclude the frames round the one dubbed
(`exclude_radius`), or it copies the answer.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dubber import media
from dubber.analysis import ProgressHook
from dubber.blend import MASK_FEATHER, hull_mask, match_seam
from dubber.face.align import crop_transforms, transform_points, warp_crop
from dubber.face.crops import CropSpec
from dubber.face.landmarks import MOUTH, centred_mouth, mouth_width, predict_landmarks
from dubber.face.morph import morph_mouth
from dubber.face.track import FaceTrack

# mouths kept (evenly spaced over the video), a minute at 25 fps: 1,500 crops are 74 MB at DCK's
# 128 px, 295 MB at rewrite's 256 px
MAX_ENTRIES = 1500
MIN_ENTRIES = 25  # fewer real mouths than a second of video cannot cover a person's shapes
STAY_MARGIN = 0.5  # keep the previous pick's successor while its shape distance is within (1 + this) x the best's
APPEARANCE = (24, 12)  # grey thumbnail (w, h) of the mouth region compared beside the shape: teeth, tongue, shadow
OUTER_LIP = slice(0, 12)  # of the 20 mouth points (48-59): the lips' outline
MASK_GROW = 0.25  # the lip mask reaches this many mouth widths beyond the outer lip
MIN_MOUTH_WIDTH = 4.0  # crop pixels: a mouth narrower than this was not found on the generated crop

def crop_box(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """A frame's face box (x0, y0, x1, y1) in crop coordinates: the box round its four corners warped."""
    x0, y0, x1, y1 = box
    corners = transform_points(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float32), matrix)
    return np.concatenate([corners.min(0), corners.max(0)]).astype(np.float32)


def mouth_shape(crop: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The 20 mouth landmarks (dlib) of a crop: uint8 BGR [S, S, 3], face box in crop pixels -> float32 [20, 2]."""
    import cv2

    return predict_landmarks(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), box)[MOUTH]


def descriptor(points: np.ndarray) -> np.ndarray:
    """Shape key of mouth points [..., 20, 2]: the points about their centroid, flattened [..., 40]
    (the crop is already aligned on eyes and nose, so scale and roll are the face's, not the mouth's)."""
    return centred_mouth(points).reshape(*points.shape[:-2], -1)


@dataclass
class MouthBank:
    """Real mouths of one video in a crop space. K entries.

    crops: uint8 BGR [K, S, S, 3]; points: float32 [K, 20, 2] mouth landmarks in crop pixels;
    frames: int64 [K] source frame of each entry (ascending). `render` keeps the previous pick.
    exclude_radius: entries within this many frames of the frame being dubbed are never picked
    (evaluation on the video itself: its own mouth at that time is the answer).
    """

    crops: np.ndarray
    points: np.ndarray
    frames: np.ndarray
    source: str = ""
    exclude_radius: int = 0
    _keys: np.ndarray = field(init=False, repr=False)
    mean_shape: np.ndarray = field(init=False, repr=False)  # the person's average mouth: centred points [20, 2]
    mean_points: np.ndarray = field(init=False, repr=False)  # ... and where it is in the crop [20, 2]
    _previous: Optional[int] = field(default=None, init=False, repr=False)
    _successor: np.ndarray = field(init=False, repr=False)
    _looks: Optional[np.ndarray] = field(default=None, init=False, repr=False)  # on first use: retrieval by shape alone needs none

    def __post_init__(self):
        self._keys = descriptor(self.points).astype(np.float32)
        # one mouth region for every crop (they are aligned): the bank's mouths' box, grown a little
        low, high = self.points.min((0, 1)), self.points.max((0, 1))
        grow = 0.1 * (high - low)
        self._region = np.concatenate([low - grow, high + grow]).round().astype(int).clip(0, self.crops.shape[1])
        self.mean_shape = self._keys.mean(0).reshape(-1, 2)
        self.mean_points = self.points.mean(0)
        # entry k + 1 continues entry k only when it is the next frame kept of the same run
        gaps = np.diff(self.frames)
        step = int(np.median(gaps)) if len(gaps) else 1
        self._successor = np.append(gaps <= step, False)

    def __len__(self) -> int:
        return len(self.frames)

    def reset(self) -> None:
        """Forget the previous pick (a new run of frames: no continuity to keep)."""
        self._previous = None

    def _look(self, crop: np.ndarray) -> np.ndarray:
        """The mouth region of a crop as a grey thumbnail, zero-mean and unit-norm: [w * h] float32."""
        import cv2

        x0, y0, x1, y1 = self._region
        grey = cv2.cvtColor(np.ascontiguousarray(crop[y0:y1, x0:x1]), cv2.COLOR_BGR2GRAY)
        look = cv2.resize(grey, APPEARANCE, interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        look -= look.mean()
        return look / max(float(np.linalg.norm(look)), 1e-6)

    def retrieve(self, points: np.ndarray, crop: Optional[np.ndarray] = None, frame: Optional[int] = None) -> int:
        """The entry whose mouth shape is closest to `points` [20, 2] -- and, given the generated
        `crop`, whose mouth region looks most alike, each distance in units of its median -- (the
        previous pick's successor when it is within STAY_MARGIN of the best); remembered for the
        next call. `frame`: the source frame being dubbed (for exclude_radius)."""
        cost = ((self._keys - descriptor(points).ravel()) ** 2).sum(1)
        if crop is not None:
            cost = cost / max(float(np.median(cost)), 1e-6)
            if self._looks is None:  # the bank's thumbnails, cut once (0.3 s for 1,500 256 px crops)
                self._looks = np.stack([self._look(entry) for entry in self.crops])
            looks = ((self._looks - self._look(crop)) ** 2).sum(1)
            cost = cost + looks / max(float(np.median(looks)), 1e-6)
        if frame is not None and self.exclude_radius > 0:
            distance = np.abs(self.frames - frame)
            near = (distance <= self.exclude_radius) & (distance < distance.max())  # a short video keeps its farthest
            cost = np.where(near, np.inf, cost)
        best = int(np.argmin(cost))
        prev = self._previous
        if prev is not None and self._successor[prev] and cost[prev + 1] <= (1 + STAY_MARGIN) * cost[best] + 1e-6:
            best = prev + 1
        self._previous = best
        return best

    def render(self, generated: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The generated crop with its lips replaced by the closest real mouth, warped onto them:
        uint8 BGR [S, S, 3] and the face box in crop pixels -> uint8 [S, S, 3]. Returned unchanged
        when no mouth is found on it."""
        import cv2

        target = mouth_shape(generated, box)
        width = mouth_width(target)
        if not np.isfinite(target).all() or width < MIN_MOUTH_WIDTH:
            self.reset()
            return generated
        k = self.retrieve(target, generated)
        size = generated.shape[0]
        affine = _fit_affine(self.points[k], target)
        real = cv2.warpAffine(self.crops[k], affine, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        outline = target[OUTER_LIP]
        centre = outline.mean(0)
        grown = centre + (outline - centre) * (1 + 2 * MASK_GROW)  # each side moves out by MASK_GROW widths
        mask = cv2.GaussianBlur(hull_mask(grown, size).astype(np.float32) / 255, (0, 0), MASK_FEATHER * size / 2)
        base = generated.astype(np.float32)
        real = match_seam(real, base, mask)  # tone differences fade out at the mask's edge
        out = base + mask[..., None] * (real - base)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


    def render_shape(self, shape: np.ndarray, frame: Optional[int] = None, centred: bool = True) -> np.ndarray:
        """The real crop whose mouth shape is closest to `shape` [20, 2], its mouth warped onto that
        shape (dubber.face.morph) -> uint8 BGR [S, S, 3]: crops are aligned, and the pipeline pastes
        its lower face under the blend's mask. `shape` (dubber.backbones.rewrite's prediction) is a
        deviation, crop pixels, from the person's mean mouth: about its centroid (centred: the lips
        stay where the retrieved mouth has them) or where the lips are in the crop. frame: the source
        frame being dubbed (for exclude_radius)."""
        target = (self.mean_shape if centred else self.mean_points) + shape
        k = self.retrieve(target, frame=frame)
        source = self.points[k]
        if centred:
            target = source.mean(0) + target
        return morph_mouth(self.crops[k], source, target)


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine [2, 3] taking points src [K, 2] onto dst [K, 2]."""
    design = np.concatenate([src, np.ones((len(src), 1), src.dtype)], 1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, dst.astype(np.float64), rcond=None)
    return solution.T.astype(np.float32)


def build_bank(info: media.MediaInfo, track: FaceTrack, spec: CropSpec, first: int = 0, smooth: bool = True,
               max_entries: int = MAX_ENTRIES, progress: Optional[ProgressHook] = None,
               shapes_from_track: bool = False) -> MouthBank:
    """Cut the real mouths of a video whose face `track` covers source frames first .. first + N:
    at most `max_entries` frames with a face, evenly spaced, in `spec`'s crop space (a photo: its
    one mouth). DubberError when fewer than MIN_ENTRIES frames of a video show a face. shapes_from_track: describe each mouth by the
    track's landmarks (as dubber.backbones.rewrite learnt them), not by landmarks found on the crop
    (as generated crops are measured)."""
    from dubber.analysis import progress_step
    from dubber.errors import DubberError

    valid = np.flatnonzero(track.valid)
    if len(valid) < (1 if info.is_image else MIN_ENTRIES):  # a photo: its one mouth (pipeline.PHOTO_LIPS)
        raise DubberError(f"a mouth bank needs at least {MIN_ENTRIES} frames with a face; found {len(valid)} "
                          "(a backbone that draws mouths, --backbone dck, needs none)", info.path)
    keep = valid[np.unique(np.linspace(0, len(valid) - 1, min(len(valid), max_entries)).round().astype(int))]
    transforms = crop_transforms(track.landmarks, spec, smooth=smooth)
    step = progress_step(progress, "mouth bank", len(keep))
    crops = np.zeros((len(keep), spec.size, spec.size, 3), np.uint8)
    points = np.zeros((len(keep), 20, 2), np.float32)
    frames = media.iter_frames(info, (keep + first).tolist()) if not info.is_image else iter([media.read_image(info.path)])
    for i, (t, frame) in enumerate(zip(keep, frames)):
        crops[i] = warp_crop(frame, transforms[t], spec.size)
        points[i] = transform_points(track.landmarks[t][MOUTH], transforms[t]) if shapes_from_track else \
            mouth_shape(crops[i], crop_box(track.boxes[t], transforms[t]))
        step(1)
    return MouthBank(crops, points, keep.astype(np.int64), source=info.path.name)
