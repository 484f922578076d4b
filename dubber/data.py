"""Training and validation data from `../shared/data`: corpus listing, splits and the preprocess cache.

`corpus` lists one split's files with their identity and audio-visual lag. `build_cache` runs
`dubber.cache.preprocess` over them in worker processes, incrementally (the cache lives outside the
repository: nothing cut from the data is ever committed). `load_clips` turns cache files into clip
dicts for the trainers, one per run of consecutive frames where the face was found:

    {"name", "identity", "fps",
     "crops": {crop key: uint8 RGB [T, S, S, 3]}, "transforms": {crop key: float32 [T, 2, 3]},
     "landmarks": float32 [T, 68, 2], "mels": float32 [T, 80, W], "speech": bool [T],
     "times": float64 [T] (seconds into the audio each frame's mel window is centred on),
     "words" (GRID, from its alignments): [(first frame, end frame, word)] said within the run}

Audio (mel windows, speech) is taken at the frame times shifted by the item's lag, so mouth and
sound line up. Nothing here imports torch: the cache workers import this module.
"""

import csv
import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dubber import audio
from dubber.analysis import ProgressHook, progress_step
from dubber.errors import DubberError
from dubber.face.crops import CropSpec

GRID_VAL_FRACTION = 0.1  # GRID: the last 10 % of each speaker's sentences (sorted) validate
GRID_ALIGN_UNITS = 25000  # GRID's .align times count 1/25,000 s (a 3 s sentence ends at 75,000)
GRID_SILENCES = ("sil", "sp")  # the alignments' labels of silence and short pauses
MIN_RUN = 16  # frames: shorter face runs are dropped (the longest backbone window, Glance's, is 16)
MIN_SYNC_PEAK = 0.2  # wild clips whose lag estimate is weaker than this are not trusted for sync
# Clips of the same person under two names, among the manifest's first rows (no `id=` note).
SAME_PERSON = {"hdtf_AOC_short": "hdtf_AlexandriaOcasioCortez", "vox2_741400163": "vox2_741400104"}
IDENTITY_NOTE = re.compile(r"\s*id=([^;\s]+)")  # `note` of rows added in rounds 2 and 3: "id=lrcar_a05; ..."
VIDEO_SUFFIXES = (".mpg", ".mp4")  # GRID ships MPEG-1 .mpg; ../shared/data re-encodes to .mp4
CRASH_RETRIES = 3  # a file whose worker process died this many times is skipped
# One thread per worker process: the workers are the parallelism (set before numpy loads in them).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# the corpus


def grid_alignment(video: Path) -> Optional[Path]:
    """The word alignment of a GRID video, <grid>/alignments/<speaker>/<utt>.align, or None."""
    path = Path(video).parent.parent / "alignments" / Path(video).parent.name / f"{Path(video).stem}.align"
    return path if path.is_file() else None


def read_alignment(path: Path) -> List[Tuple[float, float, str]]:
    """(start s, end s, word) of each spoken word of a GRID .align file (times in 1/GRID_ALIGN_UNITS
    s; silences left out)."""
    words = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] not in GRID_SILENCES:
            words.append((int(parts[0]) / GRID_ALIGN_UNITS, int(parts[1]) / GRID_ALIGN_UNITS, parts[2]))
    return words


def words_in_run(words: Sequence[Tuple[float, float, str]], fps: float, first: int, end: int) -> List[Tuple[int, int, str]]:
    """The words spoken wholly within video frames first .. end - 1, as (first frame, end frame, word)
    counted from `first` (a clip's run): a word covers the frames whose time falls in its span."""
    found = []
    for start_s, end_s, word in words:
        a, b = int(np.ceil(start_s * fps - 1e-9)), int(np.ceil(end_s * fps - 1e-9))
        if first <= a < b <= end:
            found.append((a - first, b - first, word))
    return found


def grid_split(grid_root: Path) -> Dict[str, List[Path]]:
    """GRID videos per split: <grid_root>/<speaker>/<utt>.(mpg|mp4); per speaker, in sorted order,
    the last GRID_VAL_FRACTION validate (GRID s1: the last 100 of 1000) and the rest train."""
    grid_root = Path(grid_root)
    splits: Dict[str, List[Path]] = {"train": [], "val": []}
    if not grid_root.is_dir():
        return splits
    for speaker in sorted(p for p in grid_root.iterdir() if p.is_dir() and p.name != "alignments"):
        videos = sorted(p for p in speaker.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        n_val = int(len(videos) * GRID_VAL_FRACTION)
        splits["train"].extend(videos[:len(videos) - n_val])
        splits["val"].extend(videos[len(videos) - n_val:])
    return splits


def wild_rows(root: Path, speech_only: bool = True) -> List[dict]:
    """Rows of <root>/manifest_wild.csv: those with real (present, non-silent) speech, or all of them."""
    manifest = Path(root) / "manifest_wild.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r for r in rows if not speech_only or (r["audio"] == "yes" and r["audio_silent"] != "yes")]


def identity_of(path: Path, row: Optional[dict] = None) -> str:
    """Who speaks in `path`: `id=<identity>` from its manifest row's note when present, else
    grid_<speaker> for GRID, else the file stem (SAME_PERSON merges known duplicates)."""
    path = Path(path)
    found = IDENTITY_NOTE.match((row or {}).get("note") or "")
    if found:
        return found.group(1)
    if path.parent.name.startswith("s") and path.parent.parent.name == "grid":
        return f"grid_{path.parent.name}"
    return SAME_PERSON.get(path.stem, path.stem)


SPLITS = ("train", "val", "val_select", "val_test", "grid_val")  # grid_val: GRID's held-out sentences alone


def val_halves(identities: Iterable[str]) -> Dict[str, str]:
    """The val identities, sorted by name, alternately in the selection half (early stopping,
    hyper-parameters: "val_select") and the test half that nothing is chosen on ("val_test")."""
    return {name: ("val_select", "val_test")[k % 2] for k, name in enumerate(sorted(set(identities)))}


def corpus(root: Path, split: str, grid_every: int = 1,
           offsets: Optional[Dict[str, Optional[int]]] = None) -> List[dict]:
    """Files of one split with identity and lag: [{"path", "identity", "lag"}]; lag: frames the
    mouth trails the sound.

    split: "train", "val" (GRID's held-out sentences and the wild val identities), one half of
    the wild val identities, "val_select" / "val_test" (val_halves; GRID s1 trains, so its
    sentences are in neither), or "grid_val" (GRID's held-out sentences alone: a lip reader's
    words). Every grid_every-th GRID sentence. Lags come from `offsets` (file
    relative to root -> lag, None where unknown: dubber.train.offsets) where it lists the file,
    else from the manifest's estimate; training skips clips whose lag is unknown or weak: they
    would teach the wrong sync.
    """
    if split not in SPLITS:
        raise DubberError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root, offsets = Path(root), offsets or {}
    items = []
    if split in ("train", "val", "grid_val"):
        for path in grid_split(root / "grid")["train" if split == "train" else "val"][::grid_every]:
            lag = offsets.get(path.relative_to(root).as_posix(), 0)
            if lag is not None or split != "train":
                items.append({"path": path, "identity": identity_of(path), "lag": lag or 0})
                alignment = grid_alignment(path)
                if alignment is not None:  # the words and when they are said (a lip reader's labels)
                    items[-1]["alignment"] = alignment
    if split == "grid_val":
        return items
    rows = wild_rows(root)
    halves = val_halves(identity_of(root / r["file"], r) for r in rows if r["split"] == "val")
    for row in rows:
        path = root / row["file"]
        identity = identity_of(path, row)
        if row["split"] != ("val" if split.startswith("val") else split) or (
                split in ("val_select", "val_test") and halves[identity] != split):
            continue
        peak = float(row["sync_peak_est"] or 0)
        if row["file"] in offsets:
            lag = offsets[row["file"]]
        else:
            lag = int(row["sync_lag_est"] or 0) if peak >= MIN_SYNC_PEAK else None
        if lag is None and split == "train":
            continue
        items.append({"path": path, "identity": identity, "lag": lag or 0})
    return items


# ---------------------------------------------------------------------------------------------
# the cache


def cache_path(item: dict, cache_dir: Path) -> Path:
    """Where `item`'s cache file lives: <cache_dir>/<source folder>/<stem>.npz (GRID speakers
    reuse sentence names, so the folder -- s1, wild -- keeps them apart)."""
    source = Path(item["path"])
    return Path(cache_dir) / source.parent.name / f"{source.stem}.npz"


def build_cache(items: Iterable[dict], cache_dir: Path, specs: Sequence[CropSpec] = (), workers: int = 2,
                progress: Optional[ProgressHook] = None, log: Callable[[str], None] = print) -> List[Path]:
    """Preprocess every item whose cache file is missing, from another cache version or without
    one of the `specs` crops (default: dubber.cache.default_crop_specs), in `workers` processes.

    Returns the cache files of the items (in order) that have one. A file that fails is logged
    and skipped, never stopping the build; progress: ProgressHook stage "build cache", one step a file,
    and, when one file is built, its frames as they are tracked and cropped (the stages of
    dubber.cache.preprocess): one long video is minutes of work with no file finishing.
    """
    from dubber.cache import default_crop_specs, is_current

    specs = list(specs) or default_crop_specs()
    sources = {cache_path(item, cache_dir): Path(item["path"]) for item in items}  # dicts keep order
    todo = [(source, target) for target, source in sources.items() if not is_current(target, specs)]
    step = progress_step(progress, "build cache", len(sources))
    if len(sources) > len(todo):
        step(len(sources) - len(todo))
    failed = set()
    for target, error in _build_all(todo, specs, workers, progress):
        if error is not None:
            log(f"skipped: {error}")
            failed.add(target)
            target.unlink(missing_ok=True)  # a stale file of a source that no longer builds
        step(1)
    return [target for target in sources if target not in failed]


def _build_all(todo: List[Tuple[Path, Path]], specs: List[CropSpec], workers: int,
               progress: Optional[ProgressHook] = None) -> Iterator[Tuple[Path, Optional[str]]]:
    """(target, error or None) for each (source, target) of `todo`, as they finish; `progress`
    sees the frames of a lone file (each stage is one bar, sized for one file)."""
    if workers <= 1 or len(todo) <= 1:  # a lone file: the workers track its parts (dubber.analysis.analyse)
        for source, target in todo:
            yield target, _build_one(source, target, specs, progress if len(todo) == 1 else None, workers)
        return
    # spawn: fresh interpreters, so nothing of the parent (torch, its threads, its memory) is inherited
    context = multiprocessing.get_context("spawn")
    deaths: Counter = Counter()
    while todo:
        retry = []
        with ProcessPoolExecutor(min(workers, len(todo)), context, initializer=_one_thread_worker) as pool:
            with _one_thread_children():  # the workers start in submit
                futures = {pool.submit(_build_one, s, t, specs): (s, t) for s, t in todo}
            for future in as_completed(futures):
                source, target = futures[future]
                try:
                    yield target, future.result()
                except BrokenProcessPool:  # a worker died (killed, out of memory): which file did it is unknown
                    deaths[target] += 1
                    if deaths[target] < CRASH_RETRIES:
                        retry.append((source, target))
                    else:
                        yield target, f"{source}: the worker process died on it {CRASH_RETRIES} times"
        todo = retry


@contextmanager
def _one_thread_children():
    """THREAD_VARIABLES set to 1 while worker processes start (they copy the environment)."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _one_thread_worker() -> None:
    """Pool initializer: OpenCV on one thread (numpy's BLAS got THREAD_VARIABLES at start-up)."""
    import cv2

    cv2.setNumThreads(1)


def _build_one(source: Path, target: Path, specs: List[CropSpec],
               progress: Optional[ProgressHook] = None, workers: int = 1) -> Optional[str]:
    """Write `target` (the cache of `source`); the error message when that fails, else None."""
    from dubber.cache import preprocess

    try:
        preprocess(source, target.parent, specs, progress=progress, overwrite=True, workers=workers)
    except DubberError as exc:
        return str(exc)
    except Exception as exc:  # a library failing on one odd file must not stop the build
        return f"{source}: {type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# clips


def _runs(valid: np.ndarray, min_length: int) -> List[Tuple[int, int]]:
    """[start, stop) of each run of True in valid [N] at least min_length long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(valid, np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_length]


def _speech_at(envelope: Optional[np.ndarray], times_s: np.ndarray) -> np.ndarray:
    """audio.speech_frames of a cached envelope (MEL_FPS a second) at times_s [N] -> bool [N];
    all True when the cache has no envelope (version 1: speech unknown)."""
    if envelope is None:
        return np.ones(len(times_s), bool)
    index = np.round(np.asarray(times_s) * audio.MEL_FPS).astype(np.int64)
    inside = (index >= 0) & (index < len(envelope))
    values = np.where(inside, envelope[np.clip(index, 0, max(len(envelope) - 1, 0))], 0.0)  # silence outside
    return audio.speech_frames(values)


def load_clips(items: Iterable[dict], cache_dir: Path, specs: Sequence[CropSpec],
               mel_width: int = audio.MEL_WINDOW, min_run: int = MIN_RUN, pixels: bool = True) -> List[dict]:
    """Clip dicts (see the module docstring) for the cached items with audio: one per run of at
    least min_run frames with a face, holding the crops of `specs` (without pixels: their
    transforms only, "crops" empty -- a model of landmarks needs no 2 GB of images)."""
    from dubber.cache import derive_crops, derive_source, load_cache, stored_crops

    specs = list(specs)
    keys = ["fps", "valid", "landmarks", "has_audio", "mel", "envelope"]
    clips = []
    for item in items:
        path = cache_path(item, cache_dir)
        if not path.exists():
            continue
        with np.load(path) as data:
            stored = stored_crops(data.files)
        # a missing lips crop is resampled from a stored one (dubber.cache.derive_source)
        sources = {s: derive_source(s, stored) for s in specs if s not in stored}
        wanted = [s for s in specs if s in stored] + [s for s in sources.values() if s is not None]
        prefixes = ("crops", "transform") if pixels else ("transform",)
        cache = load_cache(path, keys + [f"{prefix}_{s.key}" for s in wanted for prefix in prefixes])
        if not bool(cache["has_audio"]):
            continue
        for spec, source in sources.items():
            if source is None or not pixels:
                raise DubberError(f"the cache holds no {spec} crops: build it with that crop", path)
            cache[f"transform_{spec.key}"], cache[f"crops_{spec.key}"] = derive_crops(cache, spec, source)
        fps = float(cache["fps"])
        times = (np.arange(len(cache["valid"])) - item.get("lag", 0)) / fps
        mels = audio.mel_windows(cache["mel"], times, mel_width)
        speech = _speech_at(cache.get("envelope"), times)
        words = read_alignment(item["alignment"]) if item.get("alignment") else None
        for k, (a, b) in enumerate(_runs(cache["valid"], min_run)):
            clips.append({
                "name": f"{Path(item['path']).stem}#{k}", "identity": item["identity"], "fps": fps,
                "crops": {s.key: cache[f"crops_{s.key}"][a:b] for s in specs} if pixels else {},
                "transforms": {s.key: cache[f"transform_{s.key}"][a:b] for s in specs},
                "landmarks": cache["landmarks"][a:b], "mels": mels[a:b], "speech": speech[a:b],
                "times": times[a:b]})
            if words is not None:
                clips[-1]["words"] = words_in_run(words, fps, a, b)
    if not clips:
        raise DubberError("no usable clips (is the cache built? does the data have speech?)", cache_dir)
    return clips
