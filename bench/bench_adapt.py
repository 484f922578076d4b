#!/usr/bin/env python
"""Time `dubber adapt` with its defaults on a 1-minute 720p talking clip (issue #13: at most 5
minutes on a 2-core CPU).

    python bench/bench_adapt.py                    # 60 s of 1280x720 25 fps, CPU, the CLI's defaults
    python bench/bench_adapt.py --seconds 30 --height 1080
    python bench/bench_adapt.py --device cuda      # on a GPU
    python bench/bench_adapt.py --threads 1        # torch threads of the run (OMP_NUM_THREADS)

The clip: bench_speed.py's talking clip (three HDTF heads of ../shared/data/wild scaled to the
frame's height on a 16:9 frame, their own speech; the synthetic face without the data) looped to
--seconds with a stream copy. The run is the real CLI in a fresh process (`python -m dubber adapt
CLIP -o person.pt`, nothing else), so the wall time includes start-up, preprocessing (tracking,
crops, the lag measurement) and training. It prints the wall time, when training started (the
preprocessing's share), the steps the default budget allowed out of the default count, and the
machine's load average before and after (the figure is only comparable on an idle machine).
Exit code 1 when the wall time is over --limit-minutes.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from bench_speed import ffmpeg, frame_count, talking_clip  # noqa: E402

LIMIT_MINUTES = 5.0  # the target for a 1-minute 720p clip on a 2-core CPU


def looped_clip(folder: Path, seconds: float, height: int, fps: float) -> tuple:
    """(clip of `seconds`, description): bench_speed's talking clip, looped by a stream copy."""
    clip, described = talking_clip(folder, seconds, height, fps)
    made = frame_count(clip) / fps
    if made >= seconds - 0.5 / fps:
        return clip, described
    looped = folder / f"looped_{height}p.mp4"
    ffmpeg(["-stream_loop", "-1", "-i", clip, "-t", f"{seconds:.3f}", "-c", "copy", looped])
    return looped, f"{described}, {made:.0f} s looped to {seconds:g} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the run (default: unset)")
    parser.add_argument("--limit-minutes", type=float, default=LIMIT_MINUTES)
    args = parser.parse_args(argv)

    from dubber.checkpoint import load_package
    from dubber.train.adapt import DEFAULT_MINUTES, DEFAULT_STEPS

    with tempfile.TemporaryDirectory(prefix="dubber-adapt-bench-") as tmp:
        tmp = Path(tmp)
        clip, described = looped_clip(tmp, args.seconds, args.height, args.fps)
        print(f"input        {described}; {frame_count(clip)} frames; device {args.device}; load average "
              f"{os.getloadavg()[0]:.1f} at start", flush=True)
        out = tmp / "person.pt"
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        started = time.perf_counter()
        run = subprocess.Popen([sys.executable, "-m", "dubber", "adapt", str(clip), "-o", str(out), "--device",
                                args.device], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        training_from = None
        for line in run.stderr:  # the log: note when training starts
            if line.startswith("adapting ") and training_from is None:
                training_from = time.perf_counter() - started
            print(f"  {time.perf_counter() - started:6.0f} s  {line.rstrip()}", flush=True)
        code = run.wait()
        wall = time.perf_counter() - started
        if code != 0:
            print(f"dubber adapt failed (exit {code})", file=sys.stderr)
            return 2
        record = load_package(out)["meta"]["adapted"]
        print(f"adapt        {wall:.0f} s wall ({wall / 60:.2f} min; target <= {args.limit_minutes:g} min), "
              f"preprocessing {training_from or 0:.0f} s, then {record['steps']} of {DEFAULT_STEPS['dck']} steps "
              f"(default budget {DEFAULT_MINUTES:g} min in all); audio-visual lag {record['lag']:+d}")
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0 if wall <= args.limit_minutes * 60 else 1


if __name__ == "__main__":
    sys.exit(main())
