#!/usr/bin/env python
"""Memory and speed of `dubber lipsync` on a long 720p video: peak RSS of the whole process tree.

    python bench/bench_memory.py                     # 10 min of 1280x720 25 fps, identity backbone
    python bench/bench_memory.py --minutes 2 --detect-every 10
    python bench/bench_memory.py --backbone dck      # the real generator (needs weights/dck.pt)
    python bench/bench_memory.py --input talk.mp4 --audio speech.wav
    python bench/bench_memory.py --adapt             # `lipsync --adapt`: adapt dck to the input, then dub

Without --input it makes the input: an 8 s segment of the example face moving and turning in a
1280x720 frame, looped with `ffmpeg -stream_loop -c copy` to the asked length, and a speech-like
track of the same length. The pipeline then runs in a child process (so nothing the bench itself
allocates is counted) while this process samples the resident memory of that child and all its
descendants (the ffmpeg decoders and encoder) several times a second. It prints the input length,
frames, wall time, frames/s, the peak of the summed tree RSS (the acceptance figure; PSS, which
counts shared library pages once, beside it), the exact high-water mark of the pipeline process
(VmHWM), the sampled peaks of its ffmpeg children, and the tree's RSS at every tenth of each stage,
which must not grow with the length. Exit code 1 if the peak is over --limit-mb. psutil is used to
list the tree when installed, /proc otherwise (Linux).

The identity backbone (tests/helpers.py) returns its input crops, so the run needs no weights and
measures the pipeline (decode, track, align, crop, paste back, encode) rather than a network.
With --adapt the child first adapts dck to the input with the defaults of `dubber lipsync --adapt`
(dubber.train.adapt.adapt: its first minute at most, the default time budget), then dubs with the
adapted file: the sampled peak then covers the adaptation too.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SEGMENT_SECONDS = 8.0


# ---------------------------------------------------------------------------------------------
# resident memory of a process tree


def _children_map():
    """{ppid: [pid, ...]} for every process, from /proc/<pid>/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, IndexError, ValueError):
        return 0.0


def _pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (libraries two ffmpegs both map) split between their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def tree_pids(root: int) -> list:
    """`root` and all its descendants (psutil when installed, else /proc)."""
    try:
        import psutil

        try:
            return [root] + [p.pid for p in psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        children = _children_map()
        pids, todo = [], [root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += children.get(pid, [])
        return pids


def tree_rss_mb(root: int) -> tuple:
    """(summed RSS in MB of `root` and all its descendants, number of processes)."""
    pids = tree_pids(root)
    return sum(_rss_mb(p) for p in pids), len(pids)


class Sampler(threading.Thread):
    """Samples the RSS (and PSS) of a process tree every `interval` s: peak of the sums, peak per process."""

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = self.peak_pss = self.latest = 0.0
        self.peak_procs = self.samples = 0
        self.per_process = {}  # pid -> [name, peak RSS MB]
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> float:
        pids = tree_pids(self.root)
        rss = 0.0
        for pid in pids:
            value = _rss_mb(pid)
            rss += value
            entry = self.per_process.setdefault(pid, [_name(pid), 0.0])
            entry[1] = max(entry[1], value)
        pss = sum(_pss_mb(p) for p in pids)
        self.samples += 1
        self.latest = rss
        self.peak_pss = max(self.peak_pss, pss)
        if rss > self.peak:
            self.peak, self.peak_procs = rss, len(pids)
        return rss

    def stop(self):
        self._halt.set()
        self.join()


# ---------------------------------------------------------------------------------------------
# making the input


def make_input(folder: Path, minutes: float, size=(1280, 720), fps: float = 25.0) -> tuple:
    """A `minutes`-long video of a moving face and a speech-like track of the same length."""
    import helpers
    from dubber.media import VideoWriter

    seconds = minutes * 60
    segment, video = folder / "segment.mp4", folder / f"face_{size[1]}p_{minutes:g}min.mp4"
    speech_segment, speech = folder / "segment.wav", folder / f"speech_{minutes:g}min.wav"
    width, height = size
    with VideoWriter(segment, fps, width, height, crf=20) as encoder:
        for i in range(int(round(min(SEGMENT_SECONDS, seconds) * fps))):  # one frame at a time: no big buffers
            encoder.write(helpers.draw_marker(helpers.face_frame(i / fps, size), i % 1024))
    helpers.make_tone_speech(speech_segment, min(SEGMENT_SECONDS, seconds))
    helpers.run_ffmpeg(["-stream_loop", "-1", "-i", str(segment), "-t", f"{seconds:.3f}", "-c", "copy", str(video)])
    helpers.run_ffmpeg(["-stream_loop", "-1", "-i", str(speech_segment), "-t", f"{seconds:.3f}", "-c:a", "pcm_s16le", str(speech)])
    segment.unlink()
    speech_segment.unlink()
    return video, speech


# ---------------------------------------------------------------------------------------------
# the measured run (child process)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_child(args) -> None:
    """Run the pipeline; progress lines and a final JSON summary go to stdout for the parent."""
    import torch

    torch.set_num_threads(args.threads)
    import helpers  # noqa: F401  (registers the identity backbone)
    from dubber.pipeline import LipsyncOptions, lipsync

    marks = {}

    def progress(stage, advance, total):
        done = marks.setdefault(stage, [0, -1])
        done[0] += advance
        tenth = int(10 * done[0] / total) if total else 0
        if tenth > done[1]:
            done[1] = tenth
            print(f"PROGRESS {json.dumps({'stage': stage, 'done': done[0], 'total': total})}", flush=True)

    weights, backbone = args.weights, args.backbone
    if args.adapt:  # as `dubber lipsync --adapt` does: adapt, then dub with the adapted file
        from dubber.train.adapt import adapt

        backbone = "dck"
        weights = adapt(args.input, Path(args.output).with_name("adapted.pt"), backbone, device=args.device,
                        log=lambda message: print(message, flush=True), progress=progress)
    options = LipsyncOptions(backbone=backbone, weights=weights, device=args.device,
                             detect_every=args.detect_every, batch_size=args.batch_size, overwrite=True)
    summary = lipsync(args.input, args.audio, args.output, options, progress)
    print("RESULT " + json.dumps({
        "frames": summary.frames, "faces": summary.faces, "passed_through": summary.passed_through,
        "seconds": summary.seconds, "model_seconds": summary.model_seconds, "backbone": summary.backbone,
        "device": summary.device, "vmhwm_mb": _status_mb("VmHWM")}), flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the made input (default 10)")
    parser.add_argument("--detect-every", type=int, default=None, help="frames between face detections")
    parser.add_argument("--backbone", default="identity", help="identity (default, no weights) or dck, ...")
    parser.add_argument("--weights", default=None, help="checkpoint for --backbone")
    parser.add_argument("--adapt", action="store_true", help="adapt dck to the input first (lipsync --adapt)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--input", type=Path, help="use this video instead of making one")
    parser.add_argument("--audio", type=Path, help="speech for --input (default: the input's own audio)")
    parser.add_argument("--workdir", type=Path, help="where inputs and the output go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the made input and the output")
    parser.add_argument("--limit-mb", type=float, default=1500.0, help="fail (exit 1) above this peak (default 1500)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run_child(args)
        return 0
    if args.detect_every is None:
        from dubber.face.track import DETECT_EVERY

        args.detect_every = DETECT_EVERY

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dubber_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.input is None:
            started = time.perf_counter()
            print(f"making {args.minutes:g} min of 1280x720 25 fps input in {workdir} ...", flush=True)
            args.input, made_audio = make_input(workdir, args.minutes)
            args.audio = args.audio or made_audio
            if args.adapt:  # adaptation learns from the video's own speech: give it the track
                import helpers

                talking = args.input.with_name(f"{args.input.stem}_speech.mp4")
                helpers.run_ffmpeg(["-i", str(args.input), "-i", str(made_audio), "-map", "0:v", "-map", "1:a",
                                    "-c:v", "copy", "-c:a", "aac", str(talking)])
                args.input = talking
            print(f"  made in {time.perf_counter() - started:.0f} s", flush=True)
        args.audio = args.audio or args.input
        from dubber import media

        info = media.probe(args.input)
        output = workdir / "bench_out.mp4"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--input", str(args.input),
               "--audio", str(args.audio), "--output", str(output), "--backbone", args.backbone,
               "--device", args.device, "--detect-every", str(args.detect_every),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        if args.weights:
            cmd += ["--weights", str(args.weights)]
        if args.adapt:
            cmd += ["--adapt"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print(f"input: {args.input.name}, {info.width}x{info.height} {info.fps:g} fps, {info.duration:.1f} s; "
              f"backbone {args.backbone}{' (adapted to the input first)' if args.adapt else ''}, detect every {args.detect_every} frames", flush=True)

        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        sampler = Sampler(child.pid)
        sampler.start()
        timeline, result = [], None
        for line in child.stdout:
            if line.startswith("PROGRESS "):
                step = json.loads(line[len("PROGRESS "):])
                rss = sampler.sample()
                timeline.append(dict(step, rss_mb=rss, t=time.perf_counter() - started))
                total = step["total"] or 0
                print(f"  {step['stage']:>12} {step['done']:6d}/{total:<6d}  tree RSS {rss:7.0f} MB  "
                      f"(peak so far {sampler.peak:.0f} MB)  {time.perf_counter() - started:6.0f} s", flush=True)
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                print(line, end="")
        code = child.wait()
        wall = time.perf_counter() - started
        sampler.stop()
        if code != 0 or result is None:
            print(f"the pipeline failed (exit {code})", file=sys.stderr)
            return 2

        out_info = media.probe(output)
        figures = {
            "input_seconds": info.duration, "input_size": f"{info.width}x{info.height}", "fps": info.fps,
            "frames": result["frames"], "faces": result["faces"], "passed_through": result["passed_through"],
            "output_seconds": out_info.duration, "wall_seconds": wall, "pipeline_seconds": result["seconds"],
            "frames_per_second": result["frames"] / result["seconds"], "backbone": result["backbone"],
            "device": result["device"], "detect_every": args.detect_every,
            "peak_tree_rss_mb": sampler.peak, "peak_tree_processes": sampler.peak_procs,
            "samples": sampler.samples, "pipeline_vmhwm_mb": result["vmhwm_mb"], "peak_tree_pss_mb": sampler.peak_pss,
            "process_peaks_mb": sorted(sampler.per_process.values(), key=lambda e: -e[1]), "limit_mb": args.limit_mb,
            "timeline": timeline,
        }
        print()
        print(f"input length      {info.duration / 60:.2f} min ({info.duration:.1f} s), {info.width}x{info.height}, "
              f"{info.fps:g} fps")
        print(f"frames            {result['frames']} ({result['faces']} dubbed, {result['passed_through']} without a face); "
              f"output {out_info.duration:.2f} s")
        print(f"wall time         {wall:.1f} s (pipeline {result['seconds']:.1f} s, backbone {result['model_seconds']:.1f} s)")
        print(f"speed             {figures['frames_per_second']:.1f} frames/s")
        print(f"peak RSS, tree    {sampler.peak:.0f} MB (sum over {sampler.peak_procs} processes, "
              f"{sampler.samples} samples)")
        print(f"  PSS, tree       {sampler.peak_pss:.0f} MB (shared library pages counted once)")
        print(f"  pipeline VmHWM  {result['vmhwm_mb']:.0f} MB (the Python process's exact high-water mark)")
        ffmpegs = sorted((peak for name, peak in sampler.per_process.values() if "ffmpeg" in name), reverse=True)
        print(f"  ffmpeg          {len(ffmpegs)} processes over the run; peaks of the largest: "
              + ", ".join(f"{peak:.0f}" for peak in ffmpegs[:3]) + " MB")
        for stage in dict.fromkeys(s["stage"] for s in timeline):
            points = [s for s in timeline if s["stage"] == stage]
            print(f"  {stage:>14}: " + ", ".join(f"{100 * s['done'] / max(s['total'], 1):.0f}%: {s['rss_mb']:.0f}"
                                                 for s in points) + " MB")
        ok = sampler.peak < args.limit_mb
        print(f"{'PASS' if ok else 'FAIL'}: peak {sampler.peak:.0f} MB {'<' if ok else '>='} {args.limit_mb:.0f} MB")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
        return 0 if ok else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
