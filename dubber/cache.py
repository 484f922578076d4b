"""The preprocess cache: a face input's analysis, crops and audio features written to one .npz.

`dubber preprocess` writes it; training and evaluation read it (through dubber.data), so the
expensive part -- detection, landmarks, alignment -- runs once per file.
"""

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from dubber import audio, media
from dubber.analysis import FaceChoice, ProgressHook, analyse, progress_step
from dubber.errors import DubberError
from dubber.face.align import LIPS_SIDE, compose_affine, crop_transforms, inverse_affine, warp_crop
from dubber.face.crops import CROP_BOX, CROP_FACE, CROP_KINDS, CROP_LIPS, CropSpec

CACHE_VERSION = 2  # 2: adds `envelope`
READABLE_VERSIONS = (1, 2)  # version-1 files load without `envelope` (speech unknown)
KEEP_FRAMES_BYTES = 1 << 30  # decoded frames held between tracking and cropping (one decode); longer inputs decode twice
# A lips crop is a square inside the aligned face, so a cache without it is not rebuilt (detection
# and landmarks again): it is resampled from the stored crop that has the most pixels for it, when
# that stretches its pixels by at most this factor (lips:64 from box:128: 1.09; from face:96: 1.45).
MAX_DERIVE_UPSAMPLE = 1.5
PathLike = Union[str, Path]


def default_crop_specs() -> List[CropSpec]:
    return [CropSpec(CROP_FACE, 96), CropSpec(CROP_BOX, 128)]


def preprocess(face_path: PathLike, out_dir: PathLike, specs: Sequence[CropSpec] = (),
               choice: FaceChoice = FaceChoice(), progress: Optional[ProgressHook] = None,
               overwrite: bool = False, workers: int = 1) -> Path:
    """Analyse one photo/video and write `<out_dir>/<stem>.npz`.

    Arrays (N frames): fps, width, height, landmarks [N,68,2], boxes [N,4], valid [N],
    transform_<kind><size> [N,2,3] (frame->crop), crops_<kind><size> uint8 RGB [N,S,S,3] (zeros
    where no face), has_audio; when the file has a non-silent audio track, mel [80,T] and
    envelope [T] (audio.envelope at each mel column's time, MEL_FPS a second: audio.speech_frames
    applies at any frame time and lag). A video is decoded once when its frames fit
    KEEP_FRAMES_BYTES, else a second time for the crops; then `workers` 2 tracks its later part
    in a second process meanwhile (dubber.analysis.analyse).
    """
    out_dir = Path(out_dir)
    face_path = media.check_input(face_path)
    target = media.check_output(out_dir / f"{face_path.stem}.npz", [face_path], overwrite)
    specs = list(specs) or default_crop_specs()
    info = media.probe(face_path)
    frame_count = round(info.duration * info.fps)  # 0 when ffmpeg does not know the duration: decode twice
    keep = info.has_video and 0 < frame_count * info.width * info.height * 3 <= KEEP_FRAMES_BYTES
    analysis = analyse(face_path, choice, progress=progress, keep_frames=keep, info=info, workers=workers)
    track = analysis.track
    arrays: Dict[str, np.ndarray] = {
        "version": np.array(CACHE_VERSION), "fps": np.array(analysis.fps),
        "width": np.array(analysis.info.width), "height": np.array(analysis.info.height),
        "landmarks": track.landmarks, "boxes": track.boxes, "valid": track.valid,
        "faces_seen": np.array(track.faces_seen),
    }
    frames = [analysis.image] if analysis.is_image else analysis.frames or media.VideoReader(analysis.info)
    arrays.update(_crops(frames, track.landmarks, specs, progress))
    has_audio = False
    if analysis.info.has_audio:
        try:
            wav = audio.load_audio(face_path)
            arrays["mel"] = audio.log_mel(wav)
            arrays["envelope"] = audio.envelope(wav, np.arange(arrays["mel"].shape[1]) / audio.MEL_FPS)
            has_audio = True
        except DubberError:
            pass  # silent track: recorded as has_audio = False
    arrays["has_audio"] = np.array(has_audio)
    with media.atomic_output(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return target


def _crops(frames: Iterable[np.ndarray], landmarks: np.ndarray, specs: Sequence[CropSpec],
           progress: Optional[ProgressHook]) -> Dict[str, np.ndarray]:
    """transform_<key> [N,2,3] and crops_<key> uint8 RGB [N,S,S,3] (zeros where no face) per spec,
    from frames uint8 BGR and landmarks [N,68,2] (NaN where no face)."""
    n = len(landmarks)
    valid = ~np.isnan(landmarks[:, 0, 0])
    transforms = {s.key: crop_transforms(landmarks, s) for s in specs}
    crops = {s.key: np.zeros((n, s.size, s.size, 3), np.uint8) for s in specs}
    step = progress_step(progress, "crop faces", n)
    for t, frame in enumerate(frames):
        if t >= n:
            break
        if valid[t]:
            for spec in specs:
                crops[spec.key][t] = warp_crop(frame, transforms[spec.key][t], spec.size)[..., ::-1]
        step(1)
    arrays = {f"transform_{key}": value for key, value in transforms.items()}
    arrays.update({f"crops_{key}": value for key, value in crops.items()})
    return arrays


def load_cache(path: PathLike, keys: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Read a preprocess cache written by `preprocess`: every array, or only `keys` (those present).

    Version-1 files load too; they lack `envelope`.
    """
    path = media.check_input(path)
    try:
        with np.load(path) as data:
            version = int(data["version"]) if "version" in data.files else -1
            if version not in READABLE_VERSIONS:
                raise DubberError("preprocess cache from another dubber version; run `dubber preprocess` again", path)
            wanted = data.files if keys is None else [k for k in ("version", *keys) if k in data.files]
            return {k: data[k] for k in wanted}
    except DubberError:
        raise
    except Exception as exc:
        raise DubberError(f"not a dubber preprocess cache ({type(exc).__name__})", path) from exc


def is_current(path: PathLike, specs: Sequence[CropSpec]) -> bool:
    """Whether `path` is a cache of this version holding every crop in `specs`, or one it can be
    derived from (derive_source; reads only the version and the names)."""
    try:
        with np.load(path) as data:
            stored = stored_crops(data.files)
            return int(data["version"]) == CACHE_VERSION and all(
                s in stored or derive_source(s, stored) is not None for s in specs)
    except Exception:  # missing, truncated, not a cache: all mean "build it again"
        return False


def stored_crops(names: Iterable[str]) -> List[CropSpec]:
    """The crops a cache holds, from its array names (crops_<kind><size>)."""
    specs = []
    for name in names:
        key = name[len("crops_"):] if name.startswith("crops_") else ""
        kind = key.rstrip("0123456789")
        if kind in CROP_KINDS and key[len(kind):].isdigit():
            specs.append(CropSpec(kind, int(key[len(kind):])))
    return specs


def _pixels_per_face(spec: CropSpec) -> float:
    """Crop pixels per full-face crop side: face and box crops span the face, lips LIPS_SIDE of it."""
    return spec.size / (LIPS_SIDE if spec.kind == CROP_LIPS else 1.0)


def derive_source(spec: CropSpec, stored: Sequence[CropSpec]) -> Optional[CropSpec]:
    """The stored crop a missing lips crop is resampled from (the most pixels for it), or None when
    it cannot be derived (not a lips crop, or every stored crop stretches more than MAX_DERIVE_UPSAMPLE)."""
    candidates = [s for s in stored if s.kind in (CROP_FACE, CROP_BOX)]
    if spec.kind != CROP_LIPS or not candidates:
        return None
    source = max(candidates, key=_pixels_per_face)
    return source if _pixels_per_face(spec) / _pixels_per_face(source) <= MAX_DERIVE_UPSAMPLE else None


def derive_crops(cache: Dict[str, np.ndarray], spec: CropSpec, source: CropSpec):
    """(transforms [N, 2, 3], crops uint8 RGB [N, S, S, 3]) of `spec`, from a cache's landmarks and
    its `source` crops: the transforms exactly as preprocess computes them, each crop warped from
    the source crop through source-crop -> frame -> spec-crop (zeros where no face)."""
    transforms = crop_transforms(cache["landmarks"], spec)
    source_crops, source_transforms = cache[f"crops_{source.key}"], cache[f"transform_{source.key}"]
    crops = np.zeros((len(transforms), spec.size, spec.size, 3), np.uint8)
    for t in np.flatnonzero(~np.isnan(transforms[:, 0, 0])):
        matrix = compose_affine(transforms[t], inverse_affine(source_transforms[t]))
        crops[t] = warp_crop(source_crops[t], matrix, spec.size)
    return transforms, crops
