"""Audio-visual offsets of training clips, measured with the sync expert.

Many wild clips are not in sync as their sources ship them (-3 frames is common, one film -9), and
a generator or expert trained on them learns the wrong sync. For every clip (its cache read at lag
0) the expert scores each speech-centred 5-frame mouth window against the audio at every offset of
its search (dubber.eval.sync.offset_distances); metrics.lse turns the windows into one curve whose
minimum is the clip's offset and whose median-minus-minimum (LSE-C) is the confidence. Short
clips (1.2 s) say little alone, so each identity's windows are also pooled into one curve.

Decision per clip ("lag", frames the mouth trails the sound, the sign of dubber.data's lag): the
clip's own offset when it has at least MIN_OWN_WINDOWS speech windows and confidence at least
MIN_CONFIDENCE; else its identity's pooled offset when that is confident; else none (the clip is
left out of training that needs sync). The table is a CSV the trainer reads (`--offsets`).
"""

import csv
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from dubber.backbones.syncnet import FACE_CROP, MOUTH_FRAMES, mouths_from_faces
from dubber.eval.metrics import lse
from dubber.eval.sync import offset_distances

MIN_OWN_WINDOWS = 50  # speech windows (2 s at 25 fps) before a clip's own curve is trusted alone
MIN_CONFIDENCE = 0.05  # LSE-C of a curve before its minimum is trusted (see weights/README.md)
# Lags searched, frames either way. The expert's search reaches 15, but at its ends a 1.2 s clip has
# only a few windows with audio, and their mean dips by chance: the first table put 44 clips at
# exactly -15. Sources are off by up to ~10 frames (the data README); a minimum on the edge of
# this range is taken as no answer.
MAX_LAG = 12
COLUMNS = ("file", "identity", "frames", "speech_windows", "clip_offset", "clip_confidence",
           "identity_offset", "identity_confidence", "lag", "source")


def speech_distances(expert, clip: dict) -> np.ndarray:
    """[W, O] distances of the clip's speech-centred windows (rows) at every searched offset."""
    mouths = mouths_from_faces(clip["crops"][FACE_CROP.key])
    distances = offset_distances(expert, mouths, clip["mels"])
    half = MOUTH_FRAMES // 2
    return distances[np.asarray(clip["speech"], bool)[half:half + len(distances)]]


def _curve_offset(distances: np.ndarray):
    """(offset, confidence) of stacked window distances [W, O] within +-MAX_LAG, or (None, 0.0)
    without a window or with the minimum on the edge of the range."""
    centre = distances.shape[1] // 2
    distances = distances[:, centre - MAX_LAG:centre + MAX_LAG + 1]
    if len(distances) == 0 or np.all(np.isnan(distances)):
        return None, 0.0
    scores = lse(distances)
    offset = int(round(scores["offset"]))
    return (None, 0.0) if abs(offset) == MAX_LAG else (offset, float(scores["lse_c"]))


def measure_offsets(clips: Sequence[dict], expert, files: Dict[str, str],
                    log: Callable[[str], None] = print) -> List[dict]:
    """One table row per source file. clips: dubber.data.load_clips(..., [FACE_CROP]) of items
    loaded with lag 0 (several runs of one file are pooled); files: clip name prefix (file stem)
    -> the file's path as the table records it (relative to the data root)."""
    by_file: Dict[str, List[np.ndarray]] = {}
    identity_of, frames_of = {}, {}
    for k, clip in enumerate(clips):
        stem = clip["name"].rsplit("#", 1)[0]
        by_file.setdefault(stem, []).append(speech_distances(expert, clip))
        identity_of[stem] = clip["identity"]
        frames_of[stem] = frames_of.get(stem, 0) + len(clip["mels"])
        if (k + 1) % 100 == 0:
            log(f"offsets: {k + 1}/{len(clips)} clips scored")
    pooled: Dict[str, List[np.ndarray]] = {}
    for stem, parts in by_file.items():
        pooled.setdefault(identity_of[stem], []).extend(parts)
    identity_curve = {name: _curve_offset(np.concatenate(parts)) for name, parts in pooled.items()}
    rows = []
    for stem, parts in by_file.items():
        distances = np.concatenate(parts)
        own, own_confidence = _curve_offset(distances)
        group, group_confidence = identity_curve[identity_of[stem]]
        if own is not None and len(distances) >= MIN_OWN_WINDOWS and own_confidence >= MIN_CONFIDENCE:
            lag, source = own, "clip"
        elif group is not None and group_confidence >= MIN_CONFIDENCE:
            lag, source = group, "identity"
        else:
            lag, source = None, "unknown"
        rows.append({"file": files[stem], "identity": identity_of[stem], "frames": frames_of[stem],
                     "speech_windows": len(distances), "clip_offset": own, "clip_confidence": round(own_confidence, 4),
                     "identity_offset": group, "identity_confidence": round(group_confidence, 4),
                     "lag": lag, "source": source})
    return rows


def write_table(rows: Sequence[dict], path: Union[str, Path]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)


def read_table(path: Union[str, Path]) -> Dict[str, Optional[int]]:
    """file (relative to the data root) -> lag in frames, or None where the offset is unknown."""
    with open(path, newline="") as handle:
        return {row["file"]: (int(row["lag"]) if row["lag"] != "" else None) for row in csv.DictReader(handle)}


def measure_corpus(data_root: Union[str, Path], cache_dir: Union[str, Path], out: Union[str, Path],
                   expert_path: Optional[Union[str, Path]] = None, workers: int = 2,
                   log: Callable[[str], None] = print) -> List[dict]:
    """Measure the wild clips with speech (train and val) and GRID's held-out sentences, and write
    the table. GRID is recorded in sync (its training sentences keep lag 0 without a row); its
    held-out sentences show how often the measurement is right when the truth is known."""
    from dubber import data
    from dubber.backbones import load

    root = Path(data_root)
    grid = data.grid_split(root / "grid")
    items = [{"path": path, "identity": data.identity_of(path), "lag": 0} for path in grid["val"]]
    items += [{"path": root / row["file"], "identity": data.identity_of(root / row["file"], row), "lag": 0}
              for row in data.wild_rows(root)]  # measured as delivered: lag 0
    data.build_cache(items, cache_dir, [FACE_CROP], workers=workers, log=log)
    clips = data.load_clips(items, cache_dir, [FACE_CROP])
    files = {Path(item["path"]).stem: Path(item["path"]).relative_to(root).as_posix() for item in items}
    expert = load("syncnet", expert_path)
    rows = measure_offsets(clips, expert, files, log)
    write_table(rows, out)
    return rows


if __name__ == "__main__":
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="Measure the corpus' audio-visual offsets with the sync expert.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--expert", type=Path, default=None, help="syncnet weights (default: the shipped file)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = measure_corpus(args.data, args.cache, args.out, args.expert)
    sources = {s: sum(r["source"] == s for r in table) for s in ("clip", "identity", "unknown")}
    print(f"{len(table)} files: {sources}; wrote {args.out}")
