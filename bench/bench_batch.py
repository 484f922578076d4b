#!/usr/bin/env python
"""Wall time of one batch run here (`--jobs N`) and the same batch on a local Ray (`--ray local`,
one CPU a task, so N at once on N CPUs): same clips, same outputs.

    python bench/bench_batch.py                          # 20 clips of 1 s, 160x128, dck, N = CPUs here
    python bench/bench_batch.py --clips 8 --seconds 2 --jobs 2

Makes the clips (the example face moving and turning, tests/helpers.py) and speech of slightly
different lengths, paired by name; runs `python -m dubber lipsync FACES SPEECH -o OUT --json -q`
for each way in a child process, timed whole (start-up, Ray's start and stop included), checks
that every item was done and that both ways wrote the same files, byte for byte, and prints the
wall times with the load average before each run (the machine may be shared). Needs Ray
(`pip install 'dubber[ray]'`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import helpers  # noqa: E402


def _run(args, env) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dubber", "lipsync", *map(str, args), "--json", "-q"],
                            capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dubber failed ({result.returncode}): {result.stderr.strip()}")
    rows = json.loads(result.stdout)
    if any(row["status"] != "done" for row in rows):
        raise SystemExit(f"not every item was done: {rows}")
    return {"seconds": seconds, "load_before": load, "items": len(rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0, help="speech (so output) length of a clip")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="local --jobs (Ray: as many CPUs)")
    parser.add_argument("--backbone", default="dck")
    parser.add_argument("--work", type=Path, help="keep inputs and outputs here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as temporary:
        work = args.work or Path(temporary)
        faces, speech = work / "faces", work / "speech"
        faces.mkdir(parents=True, exist_ok=True), speech.mkdir(exist_ok=True)
        video = helpers.make_face_video(work / "face.mp4", args.seconds + 0.5, 25)
        for i in range(args.clips):
            (faces / f"clip{i:03d}.mp4").write_bytes(video.read_bytes())
            helpers.make_tone_speech(speech / f"clip{i:03d}.wav", args.seconds + 0.04 * (i % 5))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        common = [faces, speech, "--backbone", args.backbone]
        here = _run(common + ["-o", work / "local", "--jobs", args.jobs], env)
        # A local Ray gets every CPU here: with one CPU a task, as many jobs at once as --jobs above.
        on_ray = _run(common + ["-o", work / "ray", "--ray", "local", "--ray-cpus", "1"], env)
        same = helpers.tree_hashes(work / "local") == helpers.tree_hashes(work / "ray")
        print(json.dumps({"clips": args.clips, "seconds_each": args.seconds, "cpus": os.cpu_count(),
                          "local": here, "ray": on_ray, "outputs_identical": same}, indent=2))
        if not same:
            raise SystemExit("the two ways wrote different files")


if __name__ == "__main__":
    main()
