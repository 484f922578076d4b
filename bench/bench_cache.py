"""Time building the training cache two ways on the same clips, in one run.

"today": the builder of commit BEFORE_COMMIT (`dubber.train.data.build_cache`: one process, dlib
on the whole frame every 5th frame, each video decoded twice), imported from a checkout of that
commit. "new": `dubber.data.build_cache` (re-detection near the tracked face, one decode, worker
processes). Each runs in a child process (its imports are not timed; the new builder's worker
start-up is). Prints wall and CPU seconds per clip, the ratio, and how far the landmarks of the
two caches lie apart.

    .venv/bin/python bench/bench_cache.py                           # 20 GRID + 20 wild clips
    .venv/bin/python bench/bench_cache.py --grid 40 --wild 40 --repeat 2
    .venv/bin/python bench/bench_cache.py --all --new-only --cache /work/cache/v2 --crop face:96 --crop box:128

`--all` takes every GRID sentence (both splits) and every wild clip (both splits, with or without
speech); `--cache` keeps the new cache there (incremental: a second run skips what is current).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dubber import data, media  # noqa: E402
from dubber.face.crops import CropSpec  # noqa: E402
from dubber.face.landmarks import LEFT_EYE, RIGHT_EYE  # noqa: E402

BEFORE_COMMIT = "d07f106"  # the last commit before the cache moved out of pipeline.py
BEFORE_CHECKOUTS = [Path("/work/before")]  # checkouts of BEFORE_COMMIT, used when present
DATA_DIRS = [REPO.parent / "shared" / "data", Path("/work/shared/data")]

# Run in a child: build the cache of the items listed in argv[3] (JSON) into argv[2]; prints wall seconds.
TODAY = """
import json, sys, time
from pathlib import Path
import dubber.pipeline  # today's builder imports it on first use: not timed
from dubber.train.data import build_cache
print("today's dubber:", dubber.pipeline.__file__, file=sys.stderr)
items = [{"path": Path(p)} for p in json.load(open(sys.argv[3]))]
start = time.perf_counter()
build_cache(items, Path(sys.argv[2]), log=lambda m: print(m, file=sys.stderr))
print(time.perf_counter() - start)
"""
NEW = """
import json, sys, time
from pathlib import Path
from dubber.data import build_cache
from dubber.face.crops import CropSpec
items = [{"path": Path(p)} for p in json.load(open(sys.argv[3]))]
specs = [CropSpec.parse(s) for s in sys.argv[4].split(",")]
start = time.perf_counter()
build_cache(items, Path(sys.argv[2]), specs, workers=int(sys.argv[5]), log=lambda m: print(m, file=sys.stderr))
print(time.perf_counter() - start)
"""


def data_root(given):
    for folder in [Path(given)] if given else DATA_DIRS:
        if (folder / "grid").is_dir():
            return folder
    sys.exit(f"no data under {given or ' or '.join(map(str, DATA_DIRS))}")


def before_checkout(given, workdir: Path) -> Path:
    """A folder importable as today's `dubber`: --before, /work/before, or BEFORE_COMMIT extracted by git archive."""
    for folder in [Path(given)] if given else BEFORE_CHECKOUTS:
        if (folder / "dubber" / "train" / "data.py").is_file():
            return folder
    target = workdir / "before"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_COMMIT, "dubber"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def spread(paths, n):
    """n paths evenly spread over the sorted list (all when n >= len)."""
    if n >= len(paths):
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def clips(root: Path, n_grid: int, n_wild: int, everything: bool):
    splits = data.grid_split(root / "grid")
    grid = sorted(splits["train"] + splits["val"])
    wild = sorted(root / row["file"] for row in data.wild_rows(root, speech_only=False))
    return (grid, wild) if everything else (spread(grid, n_grid), spread(wild, n_wild))


def run_builder(code: str, pythonpath: Path, cache_dir: Path, listing: Path, *extra):
    """(wall seconds of the build, CPU seconds of the child and everything it waited for). Both
    builders run in the caller's environment, as `dubber train` would (the new one sets its own
    workers to one thread each)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", code, "", str(cache_dir), str(listing), *map(str, extra)],
                            env=env, capture_output=True, text=True, cwd=str(pythonpath))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in result.stderr.strip().splitlines()[-20:]:
        print(f"    | {line}")
    if result.returncode != 0:
        sys.exit(f"builder failed (exit {result.returncode})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(result.stdout.strip().splitlines()[-1]), cpu


def landmark_agreement(paths, today_dir: Path, new_dir: Path):
    """Mean landmark distance (px, and / inter-ocular distance) over frames with a face in both
    caches, and the frames with a face in each."""
    distances, relative, faces = [], [], [0, 0]
    for path in paths:
        old, new = today_dir / f"{path.stem}.npz", data.cache_path({"path": path}, new_dir)
        if not (old.exists() and new.exists()):
            continue
        with np.load(old) as a, np.load(new) as b:
            la, lb = a["landmarks"], b["landmarks"]
        n = min(len(la), len(lb))
        va, vb = ~np.isnan(la[:n, 0, 0]), ~np.isnan(lb[:n, 0, 0])
        faces[0] += int(va.sum())
        faces[1] += int(vb.sum())
        both = va & vb
        d = np.linalg.norm(la[:n][both] - lb[:n][both], axis=2).mean(axis=1)
        eyes = np.linalg.norm(la[:n][both][:, LEFT_EYE].mean(1) - la[:n][both][:, RIGHT_EYE].mean(1), axis=1)
        distances.append(d)
        relative.append(d / np.maximum(eyes, 1e-6))
    if not distances:
        return None
    return float(np.concatenate(distances).mean()), float(np.concatenate(relative).mean()), \
        int(sum(map(len, distances))), faces


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the data folder (default ../shared/data)")
    parser.add_argument("--grid", type=int, default=20, help="GRID sentences in the sample")
    parser.add_argument("--wild", type=int, default=20, help="wild clips in the sample")
    parser.add_argument("--all", action="store_true", help="every GRID sentence and every wild clip")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crop", action="append", help="crops of the new cache (default face:96, box:128)")
    parser.add_argument("--repeat", type=int, default=1, help="time the pair this many times")
    parser.add_argument("--new-only", action="store_true", help="time only the new builder")
    parser.add_argument("--before", help=f"a checkout of {BEFORE_COMMIT} (default /work/before, else git archive)")
    parser.add_argument("--cache", help="keep the new cache here (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    root = data_root(args.data)
    grid, wild = clips(root, args.grid, args.wild, args.all)
    paths = grid + wild
    infos = [media.probe(p) for p in paths]
    seconds = sum(i.duration for i in infos)
    frames = sum(round(i.duration * i.fps) for i in infos)
    specs = ",".join(str(CropSpec.parse(s)) for s in args.crop or ["face:96", "box:128"])
    print(f"clips: {len(paths)} ({len(grid)} GRID, {len(wild)} wild), {seconds:.0f} s of video, {frames} frames; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    figures = {"clips": len(paths), "video_s": seconds, "frames": frames, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_cache.") as tmp:
        work = Path(tmp)
        listing = work / "items.json"
        listing.write_text(json.dumps([str(p) for p in paths]))
        before = None if args.new_only else before_checkout(args.before, work)
        for run in range(args.repeat):
            row = {}
            if before is not None:
                today_dir = work / f"today{run}"
                print(f"today ({BEFORE_COMMIT}, 1 process) ...", flush=True)
                row["today_s"], row["today_cpu_s"] = run_builder(TODAY, before, today_dir, listing)
            new_dir = Path(args.cache) if args.cache else work / f"new{run}"
            print(f"new ({args.workers} workers) ...", flush=True)
            row["new_s"], row["new_cpu_s"] = run_builder(NEW, REPO, new_dir, listing, specs, args.workers)
            row["load_after"] = os.getloadavg()[0]
            n = len(paths)
            if before is not None:
                print(f"  today  {row['today_s']:8.1f} s  {row['today_s'] / n:6.3f} s/clip  (CPU {row['today_cpu_s'] / n:.3f} s/clip)")
            print(f"  new    {row['new_s']:8.1f} s  {row['new_s'] / n:6.3f} s/clip  (CPU {row['new_cpu_s'] / n:.3f} s/clip)"
                  f"  {frames / row['new_s']:.0f} frames/s")
            if before is not None:
                row["ratio"] = row["today_s"] / row["new_s"]
                row["cpu_ratio"] = row["today_cpu_s"] / row["new_cpu_s"]
                print(f"  ratio  {row['ratio']:.2f}x wall, {row['cpu_ratio']:.2f}x CPU; load average now {row['load_after']:.1f}")
                agreement = landmark_agreement(paths, today_dir, new_dir)
                if agreement:
                    px, rel, compared, faces = agreement
                    row["landmarks_px"], row["landmarks_iod"] = px, rel
                    print(f"  landmarks new vs today: mean {px:.2f} px ({rel:.4f} of the inter-ocular distance) over "
                          f"{compared} frames; frames with a face today {faces[0]}, new {faces[1]}")
            figures["runs"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
