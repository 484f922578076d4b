"""Calibrate `dubber check`'s thresholds: the expert's figures on real clips, on the same clips with
the audio shifted by 0.3 s (late and early), on still frames and with another clip's speech.

For every clip the mouth crops are cut once (from a preprocess cache when one is given: the same
tracker and crops as `dubber check`, so the same numbers; else tracked here) and scored by
dubber.eval.check.score against each audio:

  real     the clip's own audio, as the file plays it
  late     the same delayed by --shift seconds (what ffmpeg -itsoffset does to the audio)
  early    the same advanced by --shift seconds
  static   the first frame with a face, repeated, with the clip's own audio (a still video)
  other    the next clip's speech (a dub into words the mouth does not say)

It prints, per set and variant, the quantiles of the clip's confidence and of each second's, how
often the offset found is the expected one (within one frame; real wild clips are expected at
their measured lag in weights/offsets.csv, those without one are left out of that count), how
many clips and seconds each confidence threshold passes, and the verdicts of the current rules.

    .venv/bin/python bench/calibrate_check.py --cache /work/cache/v2 --json calibration.json
    .venv/bin/python bench/calibrate_check.py --grid 20 --wild ../evals/val_test.txt   # tracked here
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dubber import audio  # noqa: E402
from dubber.analysis import analyse  # noqa: E402
from dubber.backbones.syncnet import mouths_from_faces  # noqa: E402
from dubber.eval import check  # noqa: E402
from dubber.eval.run import load_sync_expert  # noqa: E402
from dubber.eval.sync import frame_audio, mouth_crops, offset_distances  # noqa: E402

DATA_DIRS = [REPO.parent / "shared" / "data", Path("/work/shared/data")]
VARIANTS = ("real", "late", "early", "static", "other")
LONG = 2.5  # seconds: clips at least this long are summarised apart too (most wild val clips last 1.2 s)


def mouths_of(path: Path, cache: Path = None):
    """(mouths uint8 [T, 48, 96, 3], face bool [T], fps) of a clip: from its cache file when there is one."""
    if cache is not None:
        cached = cache / path.parent.name / f"{path.stem}.npz"
        if cached.is_file():
            with np.load(cached) as data:
                if "crops_face96" in data.files:
                    return mouths_from_faces(data["crops_face96"]), data["valid"].astype(bool), float(data["fps"])
    analysis = analyse(path, keep_frames=True)
    return mouth_crops(analysis.frames, analysis.track.landmarks), analysis.track.valid, analysis.fps


def fit(wav: np.ndarray, samples: int) -> np.ndarray:
    return wav[:samples] if len(wav) >= samples else np.pad(wav, (0, samples - len(wav)))


def shifted(wav: np.ndarray, seconds: float) -> np.ndarray:
    """Delayed by `seconds` (> 0: silence first) or advanced (< 0), same length."""
    pad = int(round(abs(seconds) * audio.SAMPLE_RATE))
    if seconds > 0:
        return np.concatenate([np.zeros(pad, np.float32), wav])[:len(wav)]
    return np.concatenate([wav[pad:], np.zeros(pad, np.float32)])


def lags() -> dict:
    """file (relative to the data root) -> measured lag (frames), from weights/offsets.csv."""
    table = REPO / "weights" / "offsets.csv"
    with open(table, newline="") as handle:
        return {row["file"]: int(row["lag"]) for row in csv.DictReader(handle) if row["lag"] != ""}


def score_clip(expert, path: Path, speech_wav: np.ndarray, cache: Path, shift: float) -> dict:
    """{variant: (distances [W, O], face bool [T], speech bool [T])} and the clip's fps."""
    mouths, face, fps = mouths_of(path, cache)
    n = len(face)
    samples = int(round(n / fps * audio.SAMPLE_RATE))
    own = fit(audio.load_audio(path, video_timeline=True), samples)
    still = np.repeat(mouths[int(np.argmax(face))][None], n, 0)
    inputs = {"real": (mouths, face, own), "late": (mouths, face, shifted(own, shift)),
              "early": (mouths, face, shifted(own, -shift)), "static": (still, np.ones(n, bool), own),
              "other": (mouths, face, fit(speech_wav, samples))}
    out = {"fps": fps}
    for name, (crops, found, wav) in inputs.items():
        mels, _, voiced = frame_audio(wav, n, fps)
        out[name] = (offset_distances(expert, crops, mels), found, voiced)
    return out


def judged(measured: dict) -> dict:
    """Each clip's figures under the current rules of dubber.eval.check: {clip: {set, lag, fps, variant: {...}}}."""
    results = {}
    for name, row in measured.items():
        out = {"set": row["set"], "lag": row["lag"], "fps": row["fps"], "seconds": len(row["real"][1]) / row["fps"]}
        for variant in VARIANTS:
            distances, face, speech = row[variant]
            clip, parts, code, _ = check.judge(distances, face, speech, row["fps"])
            out[variant] = {"clip": clip.__dict__, "verdict": code,
                            "segments": [dict(s.figures.__dict__, face=s.face, flag=s.flag) for s in parts]}
        results[name] = out
    return results


def save(measured: dict, path: Path) -> None:
    arrays, meta = {}, {}
    for k, (name, row) in enumerate(measured.items()):
        meta[name] = {"key": k, "set": row["set"], "lag": row["lag"], "fps": row["fps"]}
        for variant in VARIANTS:
            for part, value in zip(("distances", "face", "speech"), row[variant]):
                arrays[f"{k}_{variant}_{part}"] = value
    np.savez_compressed(path, meta=json.dumps(meta), **arrays)


def load(path: Path) -> dict:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return {name: dict(info, **{v: tuple(data[f"{info['key']}_{v}_{part}"] for part in ("distances", "face", "speech"))
                                    for v in VARIANTS}) for name, info in meta.items()}


def quantiles(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n=0"
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return f"n={len(values):4d}  p5 {q[0]:.3f}  p25 {q[1]:.3f}  median {q[2]:.3f}  p75 {q[3]:.3f}  p95 {q[4]:.3f}"


def summarise(results: dict, shift: float) -> None:
    """Per set and variant: confidence (and confidence * sqrt(windows)) quantiles, the share the
    rule passes, how often the offset is the expected one, the verdicts and the seconds' flags."""
    groups = [(name, [r for r in results.values() if r["set"] == name]) for name in sorted({r["set"] for r in results.values()})]
    groups += [(f"{name}, clips of {LONG} s or more", [r for r in rows if r["seconds"] >= LONG]) for name, rows in groups
               if any(r["seconds"] < LONG for r in rows)]
    for group, rows in groups:
        if not rows:
            continue
        print(f"\n=== {group}: {len(rows)} clips ===")
        for variant in VARIANTS:
            for level in ("clip", "second"):
                found = ([r[variant]["clip"] for r in rows] if level == "clip" else
                         [s for r in rows for s in r[variant]["segments"]])
                found = [f for f in found if f["confidence"] is not None]
                passing = np.mean([f["confidence"] >= check.needed_confidence(f["windows"]) for f in found])
                print(f"{variant:7s} {level:6s} confidence  {quantiles([f['confidence'] for f in found])}")
                print(f"{'':14s} conf*sqrt(W) {quantiles([f['confidence'] * np.sqrt(f['windows']) for f in found])}"
                      f"  passing {passing:.2f}")
            expected = {"real": 0, "late": -shift, "early": shift}.get(variant)
            if expected is not None:
                counts = {"clip": [0, 0], "second": [0, 0]}
                for r in rows:
                    if r.get("lag") is None:
                        continue
                    target = r["lag"] + expected * r["fps"]
                    for level, found in (("clip", [r[variant]["clip"]]), ("second", r[variant]["segments"])):
                        for f in found:
                            if f["offset"] is not None:
                                counts[level][0] += abs(f["offset"] - target) <= 1
                                counts[level][1] += 1
                print(f"{'':14s} offset right (+-1 frame): clips {counts['clip'][0]}/{counts['clip'][1]}, "
                      f"seconds {counts['second'][0]}/{counts['second'][1]}")
            verdicts, flags = {}, {}
            for r in rows:
                verdicts[r[variant]["verdict"]] = verdicts.get(r[variant]["verdict"], 0) + 1
                for s in r[variant]["segments"]:
                    flags[s["flag"]] = flags.get(s["flag"], 0) + 1
            print(f"{'':14s} verdicts {verdicts}  second flags {flags}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=next((d for d in DATA_DIRS if d.is_dir()), DATA_DIRS[0]))
    parser.add_argument("--cache", type=Path, default=None, help="preprocess cache (dubber.data.build_cache layout)")
    parser.add_argument("--grid", type=int, default=100, help="GRID held-out sentences to use (0: none)")
    parser.add_argument("--wild", type=Path, default=Path("/work/evals/val_test.txt"), help="list of wild clips")
    parser.add_argument("--shift", type=float, default=0.3, help="seconds")
    parser.add_argument("--expert", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="keep every clip's distance matrices here (.npz)")
    parser.add_argument("--load", type=Path, default=None, help="judge the matrices of an earlier --save again "
                                                                "(after changing a threshold): no model run")
    parser.add_argument("--json", type=Path, default=None, help="write every clip's figures and verdicts here")
    args = parser.parse_args()
    if args.load:
        results = judged(load(args.load))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        summarise(results, args.shift)
        return
    torch.set_num_threads(1)
    from dubber.data import grid_split

    clips = [("grid", p) for p in grid_split(args.data / "grid")["val"][:args.grid]]
    if args.wild and args.wild.is_file():
        clips += [("wild", Path(line.strip())) for line in args.wild.read_text().splitlines() if line.strip()]
    expert = load_sync_expert(args.expert)
    table = lags()
    measured, started = {}, time.time()
    for k, (group, path) in enumerate(clips):
        other = next(p for g, p in clips[k + 1:] + clips[:k] if g == group)  # the next clip of the same set
        try:
            row = score_clip(expert, path, audio.load_audio(other, video_timeline=True), args.cache, args.shift)
        except Exception as exc:  # a clip that fails (no face) is reported and left out
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        relative = path.relative_to(args.data).as_posix() if path.is_relative_to(args.data) else path.name
        row.update(set=group, lag=0 if group == "grid" else table.get(relative))
        measured[str(path)] = row
        print(f"{k + 1}/{len(clips)} {path.name} ({time.time() - started:.0f} s)", file=sys.stderr)
    if args.save:
        save(measured, args.save)
    results = judged(measured)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    summarise(results, args.shift)


if __name__ == "__main__":
    main()
