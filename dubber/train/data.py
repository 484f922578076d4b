"""Training and validation clips from `../shared/data`, through the preprocess cache.

`build_cache` runs `dubber.pipeline.preprocess` over the corpus once (the cache lives outside the
repository: nothing cut from the data is ever committed). `load_clips` turns cache files into
clip dicts for the trainers:

    {"name", "identity", "split", "fps", "faces": uint8 RGB [T, S, S, 3] (a crop kind),
     "crop_from_face96": float32 [T, 2, 3] (pixel affine from the 96² aligned face to that crop),
     "mouths": uint8 RGB [T, 48, 96, 3] (lower half of the 96² aligned face), "mels": [T, 80, 16]}

Each clip is a run of consecutive frames where the face was found. Audio windows are taken at
the frame times shifted by the clip's known audio-visual lag, so mouth and sound line up.
"""

import csv
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from dubber import audio
from dubber.errors import DubberError

GRID_VAL_FRACTION = 0.1  # GRID: the last 10 % of each speaker's sentences (sorted) validate
MIN_RUN = 12  # frames: shorter face runs are dropped (a sync window needs 5, training context more)
MIN_SYNC_PEAK = 0.2  # wild clips whose lag estimate is weaker than this are not trusted for sync
MEL_WIDTH = 16
# Clips of the same person under two names (identity sampling must not count them twice).
SAME_PERSON = {"hdtf_AOC_short": "hdtf_AlexandriaOcasioCortez", "vox2_741400163": "vox2_741400104"}


def grid_split(grid_root: Path) -> Dict[str, List[Path]]:
    """GRID videos per split: <grid_root>/<speaker>/<utt>.(mpg|mp4); per speaker, in sorted order,
    the last GRID_VAL_FRACTION validate (GRID s1: the last 100 of 1000) and the rest train."""
    splits: Dict[str, List[Path]] = {"train": [], "val": []}
    grid_root = Path(grid_root)
    speakers = sorted(p for p in grid_root.iterdir() if p.is_dir() and p.name != "alignments") if grid_root.is_dir() else []
    for speaker in speakers:
        files = sorted(p for p in speaker.iterdir() if p.suffix.lower() in (".mpg", ".mp4"))
        cut = len(files) - int(len(files) * GRID_VAL_FRACTION)
        splits["train"] += files[:cut]
        splits["val"] += files[cut:]
    return splits


def wild_rows(root: Path) -> List[dict]:
    """Rows of manifest_wild.csv with real (present, non-silent) speech."""
    manifest = root / "manifest_wild.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["audio"] == "yes" and r["audio_silent"] != "yes"]


def identity_of(path: Path) -> str:
    if path.parent.name.startswith("s") and path.parent.parent.name == "grid":
        return f"grid_{path.parent.name}"
    return SAME_PERSON.get(path.stem, path.stem)


def corpus(root: Path, split: str, grid_every: int = 1) -> List[dict]:
    """Files of one split with identity and lag: [{"path", "identity", "lag"}]. lag: frames the mouth trails the sound."""
    root = Path(root)
    items = [{"path": p, "identity": identity_of(p), "lag": 0} for p in grid_split(root / "grid")[split][::grid_every]]
    for row in wild_rows(root):
        if row["split"] != split:
            continue
        peak = float(row["sync_peak_est"] or 0)
        if split == "train" and peak < MIN_SYNC_PEAK:
            continue  # lag unknown: training on it would teach the wrong sync
        lag = int(row["sync_lag_est"] or 0) if peak >= MIN_SYNC_PEAK else 0
        path = root / row["file"]
        items.append({"path": path, "identity": identity_of(path), "lag": lag})
    return items


def build_cache(items: Iterable[dict], cache_dir: Path, log: Callable[[str], None] = print) -> List[Path]:
    """Preprocess every item not yet cached (face:96 and box:128 crops); returns the cache files."""
    from dubber.cache import default_crop_specs, preprocess

    cache_dir = Path(cache_dir)
    written = []
    for item in items:
        target = cache_dir / f"{item['path'].stem}.npz"
        if not target.exists():
            try:
                preprocess(item["path"], cache_dir, default_crop_specs())
            except DubberError as exc:
                log(f"skipped: {exc}")
                continue
        written.append(target)
    return written


def _runs(valid: np.ndarray, min_length: int):
    start = None
    for t, ok in enumerate(list(valid) + [False]):
        if ok and start is None:
            start = t
        elif not ok and start is not None:
            if t - start >= min_length:
                yield start, t
            start = None


def load_clips(items: Iterable[dict], cache_dir: Path, crop: str = "box128",
               with_faces: bool = True, with_mouths: bool = True) -> List[dict]:
    """Clip dicts (see module docstring) for the cached items that have speech."""
    from dubber.eval.syncnet import mouths_from_faces
    from dubber.face.align import compose_affine, inverse_affine
    from dubber.cache import load_cache

    clips = []
    for item in items:
        path = Path(cache_dir) / f"{item['path'].stem}.npz"
        if not path.exists():
            continue
        cache = load_cache(path)
        if not bool(cache["has_audio"]):
            continue
        fps = float(cache["fps"])
        times = (np.arange(len(cache["valid"])) - item["lag"]) / fps
        mels = audio.mel_windows(cache["mel"], times, MEL_WIDTH)
        for k, (a, b) in enumerate(_runs(cache["valid"], MIN_RUN)):
            clip = {"name": f"{item['path'].stem}#{k}", "identity": item["identity"], "fps": fps,
                    "mels": mels[a:b], "landmarks": cache["landmarks"][a:b]}
            if with_faces:
                clip["faces"] = cache[f"crops_{crop}"][a:b]
                # Where the sync expert's aligned mouth lies in these crops (dubber.train.dck's sync loss).
                clip["crop_from_face96"] = compose_affine(cache[f"transform_{crop}"][a:b],
                                                          inverse_affine(cache["transform_face96"][a:b]))
            if with_mouths:
                clip["mouths"] = mouths_from_faces(cache["crops_face96"][a:b])
            clips.append(clip)
    if not clips:
        raise DubberError("no usable clips (is the cache built? does the data have speech?)", cache_dir)
    return clips
