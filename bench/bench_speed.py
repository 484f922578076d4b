#!/usr/bin/env python
"""End-to-end CPU (or GPU) speed of `dubber lipsync` on a 720p clip, stage by stage.

    python bench/bench_speed.py                       # 20 s of 1280x720 25 fps, backbone dck
    python bench/bench_speed.py --seconds 60 --threads 2 --backbone dck --device cpu

Prints: frames, wall time and frames/s end to end; the face-analysis pass (decode + dlib
detection/landmarks) and the generation pass (decode + crop + model + paste-back + encode) each
in frames/s; and the model alone (backbone forward only) in frames/s. Input as in
bench_memory.py: the example face moving in a 1280x720 frame, with a speech-like track.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backbone", default="dck")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from bench_memory import make_input
    from dubber.pipeline import LipsyncOptions, lipsync

    torch.set_num_threads(args.threads)
    stage_time = {}

    def progress(stage, advance, total):
        stage_time.setdefault(stage, [time.perf_counter(), None])[1] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="dubber-speed-") as tmp:
        video, speech = make_input(Path(tmp), args.seconds / 60.0)
        options = LipsyncOptions(backbone=args.backbone, weights=args.weights, device=args.device,
                                 batch_size=args.batch_size, overwrite=True)
        started = time.perf_counter()
        summary = lipsync(video, speech, Path(tmp) / "out.mp4", options, progress)
        wall = time.perf_counter() - started
    n = summary.frames
    print(f"input         1280x720, {args.seconds:.0f} s, {n} frames, backbone {summary.backbone} on {summary.device}, "
          f"{args.threads} torch threads, {torch.get_num_threads()} in use")
    print(f"end to end    {wall:.1f} s  {n / wall:.1f} frames/s  ({n / wall / 25:.2f}x real time at 25 fps)")
    for stage, (start, end) in stage_time.items():
        print(f"{stage:13s} {end - start:.1f} s  {n / max(end - start, 1e-9):.1f} frames/s")
    print(f"model only    {summary.model_seconds:.1f} s  {n / max(summary.model_seconds, 1e-9):.1f} frames/s")


if __name__ == "__main__":
    main()
