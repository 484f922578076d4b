"""The preprocess cache: a face input's analysis, crops and audio features written to one .npz.

`dubber preprocess` writes it; training and evaluation read it (through dubber.data), so the
expensive part -- detection, landmarks, alignment -- runs once per file.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from dubber import audio, media
from dubber.analysis import FaceChoice, ProgressHook, analyse, progress_step
from dubber.errors import DubberError
from dubber.face.align import crop_transforms, warp_crop
from dubber.face.crops import CROP_BOX, CROP_FACE, CropSpec

CACHE_VERSION = 1
PathLike = Union[str, Path]



def default_crop_specs() -> List[CropSpec]:
    return [CropSpec(CROP_FACE, 96), CropSpec(CROP_BOX, 128)]


def preprocess(face_path: PathLike, out_dir: PathLike, specs: Sequence[CropSpec] = (),
               choice: FaceChoice = FaceChoice(), progress: Optional[ProgressHook] = None,
               overwrite: bool = False) -> Path:
    """Analyse one photo/video and write `<out_dir>/<stem>.npz`.

    Arrays (N frames): fps, width, height, landmarks [N,68,2], boxes [N,4], valid [N],
    transform_<kind><size> [N,2,3] (frame->crop), crops_<kind><size> uint8 RGB [N,S,S,3] (zeros
    where no face), mel [80,T] and has_audio when the file has a non-silent audio track.
    """
    out_dir = Path(out_dir)
    face_path = media.check_input(face_path)
    target = media.check_output(out_dir / f"{face_path.stem}.npz", [face_path], overwrite)
    specs = list(specs) or default_crop_specs()
    analysis = analyse(face_path, choice, progress=progress)
    track = analysis.track
    arrays: Dict[str, np.ndarray] = {
        "version": np.array(CACHE_VERSION), "fps": np.array(analysis.fps),
        "width": np.array(analysis.info.width), "height": np.array(analysis.info.height),
        "landmarks": track.landmarks, "boxes": track.boxes, "valid": track.valid,
        "faces_seen": np.array(track.faces_seen),
    }
    transforms = {s.key: crop_transforms(track.landmarks, s) for s in specs}
    crops = {k: np.zeros((len(track), s.size, s.size, 3), np.uint8) for k, s in zip(transforms, specs)}
    frames = [analysis.image] if analysis.is_image else media.VideoReader(analysis.info)
    step = progress_step(progress, "crop faces", len(track))
    for t, frame in enumerate(frames):
        if t >= len(track):
            break
        if track.valid[t]:
            for key, spec in zip(transforms, specs):
                crops[key][t] = warp_crop(frame, transforms[key][t], spec.size)[..., ::-1]
        step(1)
    for key in transforms:
        arrays[f"transform_{key}"] = transforms[key]
        arrays[f"crops_{key}"] = crops[key]
    has_audio = False
    if analysis.info.has_audio:
        try:
            arrays["mel"] = audio.log_mel(audio.load_audio(face_path))
            has_audio = True
        except DubberError:
            pass  # silent track: recorded as has_audio = False
    arrays["has_audio"] = np.array(has_audio)
    with media.atomic_output(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return target


def load_cache(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a preprocess cache written by `preprocess`."""
    path = media.check_input(path)
    try:
        with np.load(path) as data:
            cache = {k: data[k] for k in data.files}
    except Exception as exc:
        raise DubberError(f"not a dubber preprocess cache ({type(exc).__name__})", path) from exc
    if int(cache.get("version", -1)) != CACHE_VERSION:
        raise DubberError("preprocess cache from another dubber version; run `dubber preprocess` again", path)
    return cache
