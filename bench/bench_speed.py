#!/usr/bin/env python
"""End-to-end speed of `dubber lipsync` on a real talking clip, beside the ffmpeg floor, and where the time goes.

    python bench/bench_speed.py                          # 20 s of 1280x720 25 fps, 3 runs + a stage profile
    python bench/bench_speed.py --height 1080 --fps 60 --runs 1 --no-profile
    python bench/bench_speed.py --photo                  # a 512x512 photo speaking 20 s
    python bench/bench_speed.py --photo --no-mouth-bank  # ... with the generated lips, not the photo's own
    python bench/bench_speed.py --backbone dck           # another backbone than lipsync's default
    python bench/bench_speed.py --backbone cran --weights runs/cran/cran.pt   # one without shipped weights
    python bench/bench_speed.py --device cuda --half     # on a GPU

The clip: three HDTF talking heads of ../shared/data/wild (512x512, 25 fps, their own speech)
scaled to the frame's height (faces ~330 px wide at 720p), centred on a 16:9 frame and joined,
cut to --seconds; without ../shared/data, the synthetic moving face of bench_memory.py (say so
in any figure). Each run is the real CLI in a fresh process (`python -m dubber lipsync CLIP CLIP
-o out.mp4`, the clip's own speech) with no stored analysis (DUBBER_CACHE_DIR=off): its wall
time includes start-up (imports, weights) and both passes. "second dub" times the same command
once the video's analysis is stored (dubbing it into another language). The floor is a plain `ffmpeg` decode + x264 re-encode of the same clip with the
pipeline's encoder settings, timed in the same run; the ratio of the two is what load on the
machine changes least.

The stage profile (one more run, in a child process, --profile) accounts for the CPU time:
the main thread's by function under cProfile with a CPU-time clock (decode = reading the pipe
and converting I420 to BGR, encode = converting back and writing the pipe, ...), the other
threads' (the model worker and torch's pool) as one figure, and the child processes' (the two
ffmpeg decoders, the encoder, and the tracker process of a long video) from their rusage. cProfile slows the Python-heavy stages; the table is
for finding where time goes, the timed runs are the figures.
"""

import argparse
import ast
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

DATA = REPO.parent / "shared" / "data" / "wild"
TALKING_HEADS = ("hdtf_AlexandriaOcasioCortez.mp4", "hdtf_KatieHill.mp4", "hdtf_BobMenendez.mp4")
CLIP_CRF = 18  # the made clip's own quality: a good source, like a user's camera file
PHOTO_SIDE = 512

# Main-thread stages: the functions whose inclusive CPU time is the stage (none calls another).
STAGES = (
    ("audio decode + mel", ("dubber/audio.py", "load_audio"), ("dubber/audio.py", "log_mel")),
    ("weights load", ("dubber/backbones/__init__.py", "load_backbone")),
    ("decode (pipe, I420->BGR)", ("dubber/media.py", "VideoReader.__iter__")),
    ("detection", ("dubber/face/detect.py", "_detect")),
    ("landmarks", ("dubber/face/landmarks.py", "predict_landmarks")),
    ("alignment + smoothing", ("dubber/face/align.py", "crop_transforms")),
    ("crop", ("dubber/face/align.py", "warp_crop")),
    ("mask", ("dubber/blend.py", "lower_face_mask")),
    ("colour match", ("dubber/blend.py", "match_colour"), ("dubber/blend.py", "Palette.__init__"),
     ("dubber/blend.py", "Palette.fix"), ("dubber/blend.py", "match_seam")),
    ("paste-back", ("dubber/blend.py", "Paster.__init__"), ("dubber/blend.py", "Paster.__call__")),  # minus colour
    # match, which Paster.__call__ calls
    ("encode (BGR->I420, pipe)", ("dubber/media.py", "VideoWriter.write")),
)


def ffmpeg(args) -> None:
    """ffmpeg quietly (tests/helpers.run_ffmpeg)."""
    import helpers

    helpers.run_ffmpeg([str(a) for a in args])


def talking_clip(folder: Path, seconds: float, height: int, fps: float) -> tuple:
    """(video, description): the HDTF heads at `height` on a 16:9 frame, or the synthetic face."""
    width = (height * 16 // 9 + 1) // 2 * 2
    sources = [DATA / name for name in TALKING_HEADS]
    out = folder / f"talk_{height}p{fps:g}.mp4"
    if not all(p.is_file() for p in sources):
        from bench_memory import make_input

        video, speech = make_input(folder, seconds / 60.0, (width, height), fps)
        ffmpeg(["-i", video, "-i", speech, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", out])
        return out, f"synthetic moving face (no {DATA}), {width}x{height}, {fps:g} fps"
    inputs, chains, joined = [], [], ""
    for i, path in enumerate(sources):
        inputs += ["-i", path]
        chains.append(f"[{i}:v]scale={height}:{height}:flags=lanczos,pad={width}:{height}:(ow-iw)/2:0,"
                      f"setsar=1,fps={fps:g}[v{i}]")
        joined += f"[v{i}][{i}:a]"
    graph = ";".join(chains) + f";{joined}concat=n={len(sources)}:v=1:a=1[v][a]"
    ffmpeg([*inputs, "-filter_complex", graph, "-map", "[v]", "-map", "[a]", "-t", f"{seconds:.3f}",
            "-c:v", "libx264", "-crf", CLIP_CRF, "-preset", "medium", "-pix_fmt", "yuv420p", "-c:a", "aac", out])
    names = ", ".join(p.stem for p in sources)
    return out, f"{names} scaled to {height}x{height} on {width}x{height}, {fps:g} fps (faces ~{height * 0.46:.0f} px wide)"


def floor_seconds(clip: Path, out: Path) -> float:
    """A plain decode + x264 re-encode of `clip` with the pipeline's encoder settings: seconds."""
    from dubber.media import AUDIO_BITRATE, VIDEO_CRF, VIDEO_PRESET

    started = time.perf_counter()
    ffmpeg(["-i", clip, "-c:v", "libx264", "-preset", VIDEO_PRESET, "-crf", VIDEO_CRF, "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", AUDIO_BITRATE, out])
    return time.perf_counter() - started


def cli_seconds(face: Path, speech: Path, out: Path, args, store: str = "off") -> float:
    """Wall seconds of one `dubber lipsync` in a fresh process; store: its DUBBER_CACHE_DIR ("off": a
    first dub, the face analysed)."""
    cmd = [sys.executable, "-m", "dubber", "lipsync", face, speech, "-o", out, "--overwrite", "--quiet",
           "--device", args.device, "--precision", args.precision, *(["--half"] if args.half else []),
           *(["--backbone", args.backbone] if args.backbone else []),
           *(["--weights", args.weights] if args.weights else []),
           *(["--no-mouth-bank"] if args.no_mouth_bank else [])]
    env = dict(os.environ, DUBBER_CACHE_DIR=store, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    started = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def frame_count(path: Path) -> int:
    from dubber import media

    info = media.probe(path)
    return int(round(info.duration * info.fps))


@functools.lru_cache(maxsize=None)
def _definitions(filename: str) -> dict:
    """{line of a def: its qualified name (Class.method)} of a source file ({} when unreadable)."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    names = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    names[child.lineno] = name
                visit(child, name + ".")
    visit(tree, "")
    return names


def qualified_name(filename: str, line: int, name: str) -> str:
    """cProfile's (file, line, name) -> "Class.method" for methods, the plain name otherwise."""
    return _definitions(filename).get(line, name)


def stage_seconds(stats: dict) -> dict:
    """{stage: inclusive CPU seconds} of a pstats table (paste-back without the colour match it calls)."""
    inclusive = {}
    for (filename, line, name), (_, _, _, cumulative, _) in stats.items():
        name = qualified_name(filename, line, name)
        for stage, *functions in STAGES:
            if any(filename.endswith(f) and name == n for f, n in functions):
                inclusive[stage] = inclusive.get(stage, 0.0) + cumulative
    inclusive["paste-back"] = inclusive.get("paste-back", 0.0) - inclusive.get("colour match", 0.0)
    return inclusive


def profile_child(face: str, speech: str, out: str, device: str, precision: str, backbone: str, weights: str,
                  mouth_bank: str) -> None:
    """Run lipsync once under cProfile (CPU-time clock) and print the stage table as JSON; the
    options as the timed runs' ("" for lipsync's default backbone and weights).

    The main thread and every thread it starts (the paste thread, the model worker) are profiled;
    stages are summed over them. "model" is what no profiled function of a stage accounts for
    outside the main thread: torch's own threads and the model worker's calls."""
    import cProfile
    import pstats
    import threading

    before_imports = time.process_time()
    import torch  # noqa: F401  (what the CLI imports before it starts)

    from dubber.pipeline import lipsync

    imports_cpu = time.process_time() - before_imports
    thread_profilers = []

    def profile_thread(*_):  # a new thread's first event: profile it from here on
        thread_profilers.append(cProfile.Profile(time.thread_time))
        thread_profilers[-1].enable()

    main0, process0 = time.thread_time(), time.process_time()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    profiler = cProfile.Profile(time.thread_time)
    started = time.perf_counter()
    threading.setprofile(profile_thread)
    profiler.enable()
    summary = lipsync(face, speech, out, overwrite=True, device=device, precision=precision,
                      backbone=backbone or None, weights=weights or None, mouth_bank=None if mouth_bank == "auto" else False)
    profiler.disable()
    threading.setprofile(None)
    wall = time.perf_counter() - started
    main, process = time.thread_time() - main0, time.process_time() - process0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = child.ru_utime + child.ru_stime - child0.ru_utime - child0.ru_stime
    in_main = stage_seconds(pstats.Stats(profiler).stats)
    in_threads = stage_seconds(pstats.Stats(*thread_profilers).stats) if thread_profilers else {}
    rows = [(stage, in_main.get(stage, 0.0) + in_threads.get(stage, 0.0)) for stage, *_ in STAGES]
    rows.append(("other (main thread)", main - sum(in_main.values())))
    rows.append(("model (worker + torch threads)", process - main - sum(in_threads.values())))
    rows.append(("child processes (ffmpeg x3, tracker)", children))
    print(json.dumps({"frames": summary.frames, "wall": wall, "imports_cpu": imports_cpu, "rows": rows,
                      "cpu": process + children}))


def profile(face: Path, speech: Path, out: Path, args) -> dict:
    env = dict(os.environ, DUBBER_CACHE_DIR="off", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    result = subprocess.run([sys.executable, __file__, "--profile-child", str(face), str(speech), str(out),
                             args.device, args.precision, args.backbone or "", args.weights or "",
                             "off" if args.no_mouth_bank else "auto"], check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--runs", type=int, default=3, help="timed CLI runs (the median is the figure)")
    parser.add_argument("--photo", action="store_true", help=f"a {PHOTO_SIDE}x{PHOTO_SIDE} photo of the clip's face instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default=None, help="as lipsync's (default: lipsync's own for the input)")
    parser.add_argument("--weights", default=None, help="as lipsync's: the backbone's weights file (e.g. a training run's)")
    parser.add_argument("--no-mouth-bank", action="store_true", help="as lipsync's (a photo: the generated lips, not the photo's)")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--precision", default="auto", help="the model's arithmetic: auto, fp32 or bf16 (--precision)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the CLI runs (OMP_NUM_THREADS; "
                        "default: the CLI's own choice)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_child:
        return profile_child(*args.profile_child)

    with tempfile.TemporaryDirectory(prefix="dubber-speed-") as tmp:
        tmp = Path(tmp)
        clip, described = talking_clip(tmp, args.seconds, args.height, args.fps)
        face = clip
        if args.photo:
            face = tmp / "face.png"
            side = args.height
            ffmpeg(["-i", clip, "-frames:v", "1", "-vf", f"crop={side}:{side}:(iw-ow)/2:0,scale={PHOTO_SIDE}:{PHOTO_SIDE}",
                    face])
            described = f"a {PHOTO_SIDE}x{PHOTO_SIDE} photo (first frame of: {described}), speech {args.seconds:g} s"
        n = frame_count(clip)
        print(f"input        {described}; {n} output frames; device {args.device}, precision {args.precision}; "
              f"load average {os.getloadavg()[0]:.1f} at start")
        if args.runs:  # 0: the stage profile only
            floors, runs = [], []
            for _ in range(args.runs):  # interleaved, so load changes hit both alike
                floors.append(floor_seconds(clip, tmp / "floor.mp4"))
                runs.append(cli_seconds(face, clip, tmp / "out.mp4", args))
            wall, floor = statistics.median(runs), statistics.median(floors)
            print(f"dubber       {wall:.2f} s  {n / wall:.1f} frames/s  (runs: {', '.join(f'{s:.2f}' for s in runs)} s; "
                  f"{n / wall / args.fps:.2f}x real time)")
            print(f"ffmpeg floor {floor:.2f} s  {n / floor:.1f} frames/s  (decode + x264 re-encode; runs: "
                  f"{', '.join(f'{s:.2f}' for s in floors)} s)")
            print(f"ratio        dubber takes {wall / floor:.2f}x the floor's time")
        if args.runs and not args.photo:  # the same video dubbed again (another language): analysis reused
            store = tmp / "store"
            cli_seconds(face, clip, tmp / "out.mp4", args, str(store))
            again = statistics.median(cli_seconds(face, clip, tmp / "out.mp4", args, str(store))
                                      for _ in range(args.runs))
            print(f"second dub   {again:.2f} s  {n / again:.1f} frames/s  (the video's face analysis reused; "
                  f"median of {args.runs})")
        print(f"load average {os.getloadavg()[0]:.1f} at end")
        if args.profile:
            figures = profile(face, clip, tmp / "out.mp4", args)
            frames = figures["frames"]
            print(f"\nstage profile (one run under cProfile, CPU time; {figures['wall']:.1f} s wall, "
                  f"{figures['cpu']:.1f} s CPU in all, {frames} frames; imports before it {figures['imports_cpu']:.1f} s CPU)")
            for stage, seconds in figures["rows"]:
                print(f"  {stage:38s} {seconds:7.2f} s  {1000 * seconds / max(frames, 1):6.2f} ms/frame")


if __name__ == "__main__":
    main()
