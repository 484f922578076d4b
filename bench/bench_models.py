#!/usr/bin/env python
"""Model-only speed of every generator backbone on the CPU (or --device): frames a second through
the runner lipsync uses (dubber.apply: windows, overlap cross-fades, carried state), on random
crops and mel windows of each backbone's own size, nothing decoded, tracked, pasted or encoded.

    python bench/bench_models.py                         # every backbone, 250 frames each, 3 runs
    python bench/bench_models.py --backbone cran --backbone glance --frames 500
    python bench/bench_models.py --threads 1             # torch threads (default: torch's own)

Speed does not depend on the weights, so each backbone is built fresh with its default
constructor arguments (the shipped architectures): no trained file is needed and untrained
backbones are timed alike. The figure is the median of --runs runs after one warm-up window. On a
shared machine, time nothing while a training run is using the cores, or compare ratios taken in
one run of this script.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_backbone(name: str, frames: int, runs: int, device: str) -> dict:
    """{"backbone", "params_m", "crop", "fps"}: median frames/s of the runner over `frames` frames."""
    import torch

    from dubber.apply import Generator, Step, apply_backbone
    from dubber.backbones import CONDITION_NONE, available

    cls = available()[name]
    torch.manual_seed(0)
    model = cls().eval()
    size = model.crop.size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (frames, size, size, 3), np.uint8)
    mels = rng.normal(-2, 1, (frames, 80, model.mel_width)).astype(np.float32)
    identity = crops[0] if model.conditioning != CONDITION_NONE else None
    generator = Generator(model, torch.device(device))

    def once(count: int) -> float:
        started = time.perf_counter()
        for _ in apply_backbone(generator, (Step(c, m) for c, m in zip(crops[:count], mels[:count])), identity):
            pass
        return time.perf_counter() - started

    once(model.window)  # warm-up: first calls allocate
    seconds = statistics.median(once(frames) for _ in range(runs))
    return {"backbone": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "crop": f"{model.crop}", "fps": frames / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", help="repeatable (default: every generator but the test ones)")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from dubber.backbones import available

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.backbone or sorted(n for n in available() if not n.startswith("toy"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, "
          f"{args.frames} frames, median of {args.runs}")
    print(f"{'backbone':10} {'params (M)':>10} {'crop':>10} {'frames/s':>9} {'ms/frame':>9}")
    for name in names:
        row = time_backbone(name, args.frames, args.runs, args.device)
        print(f"{row['backbone']:10} {row['params_m']:10.2f} {row['crop']:>10} {row['fps']:9.1f} {1000 / row['fps']:9.2f}")


if __name__ == "__main__":
    main()
