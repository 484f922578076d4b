"""Reading and writing media through ffmpeg pipes: probe, stream frames, decode audio, encode MP4.

Frames are numpy uint8 [H, W, 3] in BGR order (OpenCV's), upright (ffmpeg applies a phone's
rotation metadata while decoding). Nothing holds more than one frame per stage in memory.

Frames of even size cross the pipes as planar YUV 4:2:0 (I420), converted to and from BGR by
OpenCV: half the bytes of BGR, and ffmpeg's exact-rounding RGB conversion is not run (a 720p
decode to the pipe: 11.7 ms of CPU a frame as BGR, 4.4 as I420 plus ~1 ms for OpenCV's
conversion). OpenCV's BT.601 conversion agrees with ffmpeg's to 52 dB (mean 0.2 grey levels); a
frame decoded from I420 goes back to I420 unchanged but for clipped colours (mean 0.005 levels),
while a photo's sharp colour edges lose what 4:2:0 chroma cannot hold (46.7 dB on the test face).
"""

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from dubber.errors import DubberError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DEFAULT_IMAGE_FPS = 25.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in grey (every RGB -> grey in dubber)
VIDEO_CRF = 16  # H.264 quality: with VIDEO_PRESET, a 720p talking clip re-encodes at 50.4 dB PSNR (veryfast at 14: 50.1)
# Exact-rounding colour conversion with full chroma: BGR<->yuv420p costs > 60 dB instead of ~40.
SWS_FLAGS = "bicubic+accurate_rnd+full_chroma_int"
# x264's fastest preset: 5.7 ms of CPU a 720p frame against 25 for veryfast at equal quality
# (above), the files about twice as large (8.6 Mbit/s at 720p); --preset trades speed for size.
VIDEO_PRESET = "ultrafast"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
AUDIO_BITRATE = "160k"
SEEK_BLOCK = 64  # frames decoded per seek when a video plays backwards (ping-pong)
# ascending frames at most this far apart are read in one pass, the ones between dropped before
# conversion, rather than one seek each: a seek decodes again from the previous keyframe (a mouth
# bank of every 10th frame of a 10-minute 720p video took 187 s with a seek per frame; every 10th
# of a 60 s 720p clip: 31.4 s a seek each, 2.7 s in one pass, the same pixels)
SPARSE_GAP = 32
PIPE_YUV = "yuv420p"  # raw frame format on the pipes when both sides are even (see the module docstring)
PARTIAL = ".partial"  # atomic_output's temporaries: .STEM.XXXXXXXX.partial.SUFFIX beside the output
_PARTIAL_NAME = re.compile(r"^\.(?P<stem>.+)\.[a-z0-9_]{8}" + re.escape(PARTIAL) + r"(?P<suffix>(\.[^.]*)?)$")

PathLike = Union[str, Path]


def ffmpeg_exe() -> str:
    """$DUBBER_FFMPEG, else the system ffmpeg when present, else the binary bundled with imageio-ffmpeg."""
    found = os.environ.get("DUBBER_FFMPEG") or shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def file_sha256(path: PathLike) -> str:
    """sha256 of a file's bytes (hex), read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class MediaInfo:
    """What `probe` reads from ffmpeg's description of a file. Sizes are as displayed (rotation applied)."""

    path: Path
    duration: float  # seconds, 0 when unknown
    has_video: bool = False
    width: int = 0
    height: int = 0
    fps: float = 0.0
    rotation: int = 0  # degrees, already applied by the decoder
    has_audio: bool = False
    sample_rate: int = 0
    channels: int = 0

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS


_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: (Video|Audio): (.*)")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_SIZE_RE = re.compile(r", (\d{2,5})x(\d{2,5})")
_FPS_RE = re.compile(r", (\d+(?:\.\d+)?)(k?) (?:fps|tbr)")
_RATE_RE = re.compile(r"(\d+) Hz")
_ROTATION_RE = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees|rotate\s*:\s*(-?\d+)")


def check_input(path: PathLike) -> Path:
    """Existence and readability checks every command makes before touching a file."""
    path = Path(path)
    if not path.exists():
        raise DubberError("file not found", path)
    if path.is_dir():
        raise DubberError("is a folder, expected a file", path)
    if not os.access(path, os.R_OK):
        raise DubberError("file is not readable (permission denied)", path)
    if path.stat().st_size == 0:
        raise DubberError("file is empty", path)
    return path


def probe(path: PathLike) -> MediaInfo:
    """Describe a media file from `ffmpeg -i` (imageio-ffmpeg ships no ffprobe)."""
    path = check_input(path)
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                            capture_output=True, text=True, errors="replace")
    text = result.stderr
    info = MediaInfo(path=path, duration=0.0)
    match = _DURATION_RE.search(text)
    if match:
        h, m, s = match.groups()
        info.duration = int(h) * 3600 + int(m) * 60 + float(s)
    video_seen = False
    for line in text.splitlines():
        stream = _STREAM_RE.search(line)
        if stream and stream.group(1) == "Video" and not video_seen and "attached pic" not in line:
            video_seen = True
            desc = stream.group(2)
            size = _SIZE_RE.search(desc)
            if size:
                info.has_video = True
                info.width, info.height = int(size.group(1)), int(size.group(2))
            fps = _FPS_RE.search(desc)
            if fps:
                info.fps = float(fps.group(1)) * (1000 if fps.group(2) else 1)
        elif stream and stream.group(1) == "Audio" and not info.has_audio:
            info.has_audio = True
            rate = _RATE_RE.search(stream.group(2))
            info.sample_rate = int(rate.group(1)) if rate else 0
            desc = stream.group(2)
            info.channels = 1 if "mono" in desc else 2 if "stereo" in desc else _channel_count(desc)
        rotation = _ROTATION_RE.search(line)
        if rotation and video_seen and not info.rotation:
            info.rotation = int(round(float(rotation.group(1) or rotation.group(2)))) % 360
    if info.rotation in (90, 270):
        info.width, info.height = info.height, info.width
    if not info.has_video and not info.has_audio:
        reason = text.strip().splitlines()[-1] if text.strip() else "unknown format"
        raise DubberError(f"not a media file ffmpeg can read ({reason.split(': ')[-1]})", path)
    if info.fps > 240 or info.fps <= 0:
        # ffmpeg reports 90k tbr for some streams and nothing for images; fall back to a sane rate.
        info.fps = DEFAULT_IMAGE_FPS if info.fps <= 0 else 30.0
    for ntsc in (24000 / 1001, 30000 / 1001, 60000 / 1001):
        if abs(info.fps - ntsc) < 0.006:  # ffmpeg prints 29.97; 0.1 % drift is 1.5 frames in 10 min
            info.fps = ntsc
    return info


def _channel_count(desc: str) -> int:
    match = re.search(r"(\d+)(?:\.(\d+))? channels|(\d)\.(\d)", desc)
    if not match:
        return 0
    if match.group(1):
        return int(match.group(1))
    return int(match.group(3)) + int(match.group(4))


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image file to uint8 BGR [H, W, 3] (EXIF orientation applied, alpha dropped)."""
    import cv2

    path = check_input(path)
    data = np.fromfile(str(path), dtype=np.uint8)  # survives non-ASCII paths, unlike cv2.imread
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DubberError("not a readable image", path)
    return image


def write_image(path: PathLike, image: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(Path(path).suffix or ".png", image)
    if not ok:
        raise DubberError("could not encode image", path)
    with atomic_output(path) as tmp:
        data.tofile(str(tmp))


class VideoReader:
    """Stream frames of a video at a constant rate `info.fps`, frame i at time i / fps.

    Iterating yields uint8 BGR [H, W, 3] from `start` on. A truncated file yields the frames
    that decode; `frames_read` tells how many arrived.
    """

    def __init__(self, info: MediaInfo, start: int = 0, count: Optional[int] = None,
                 wanted: Optional[Sequence[int]] = None):
        self.info = info
        self.start = start
        self.count = count
        self.wanted = None if wanted is None else set(wanted)  # offsets from start to yield (None: all)
        self.frames_read = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        import cv2

        w, h = self.info.width, self.info.height
        yuv = _even(w, h)
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"]
        if self.start:
            cmd += ["-ss", f"{self.start / self.info.fps:.6f}"]
        scale = "" if yuv else f",scale={w}:{h}:flags={SWS_FLAGS}"
        cmd += ["-i", str(self.info.path), "-map", "0:v:0", "-an", "-sn",
                "-vf", f"fps={self.info.fps!r}{scale}", "-f", "rawvideo", "-pix_fmt", PIPE_YUV if yuv else "bgr24"]
        if self.count is not None:
            cmd += ["-frames:v", str(self.count)]
        cmd += ["-"]
        frame_bytes = w * h * 3 // 2 if yuv else w * h * 3
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, bufsize=frame_bytes)
            try:
                while True:
                    data = proc.stdout.read(frame_bytes)
                    if len(data) < frame_bytes:
                        break
                    self.frames_read += 1
                    if self.wanted is not None and self.frames_read - 1 not in self.wanted:
                        continue
                    if yuv:
                        yield cv2.cvtColor(np.frombuffer(data, np.uint8).reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)
                    else:
                        yield np.frombuffer(data, np.uint8).reshape(h, w, 3)
            finally:
                proc.stdout.close()
                proc.kill() if proc.poll() is None else None
                proc.wait()


def _even(width: int, height: int) -> bool:
    """Frames of this size can cross a pipe as I420 (4:2:0 needs even sides)."""
    return width % 2 == 0 and height % 2 == 0


def iter_frames(info: MediaInfo, indices: Sequence[int]) -> Iterator[np.ndarray]:
    """Yield frames of `info` in the order `indices` lists them, decoding each ascending run once
    (frames at most SPARSE_GAP apart count as one run: the ones between are decoded and dropped).

    Descending runs (ping-pong playback) are decoded in blocks of SEEK_BLOCK frames and reversed,
    so memory stays bounded whatever the length.
    """
    i = 0
    n = len(indices)
    while i < n:
        j = i + 1
        step = 1 if j < n and indices[j] == indices[i] + 1 else -1 if j < n and indices[j] == indices[i] - 1 else 0
        while j < n and step and indices[j] == indices[j - 1] + step:
            j += 1
        if not step:  # frames a few apart, ascending: one pass, the ones between dropped
            while j < n and 0 < indices[j] - indices[j - 1] <= SPARSE_GAP:
                j += 1
        run = indices[i:j]
        if step == 0 and len(run) > 1:
            yield from VideoReader(info, start=run[0], count=run[-1] - run[0] + 1,
                                   wanted=[k - run[0] for k in run])
        elif step >= 0:
            for frame in VideoReader(info, start=run[0], count=len(run)):
                yield frame
        else:
            hi = run[0]
            lo = run[-1]
            top = hi
            while top >= lo:
                bottom = max(lo, top - SEEK_BLOCK + 1)
                block = list(VideoReader(info, start=bottom, count=top - bottom + 1))
                for frame in reversed(block):
                    yield frame
                top = bottom - 1
        i = j


def decode_audio(path: PathLike, sample_rate: int, video_timeline: bool = False) -> np.ndarray:
    """Decode the first audio stream of any file ffmpeg reads to float32 mono [n] at sample_rate.

    video_timeline: sample 0 is at the file's first video frame, as a player sounds it: an audio
    stream that starts later (muxed with a delay, ffmpeg -itsoffset) is preceded by silence, one
    that starts before the picture is cut. Otherwise sample 0 is the stream's first sample.
    """
    info = probe(path)
    if not info.has_audio:
        raise DubberError("has no audio stream", path)
    timeline = ["-af", "aresample=async=1:first_pts=0"] if video_timeline else []  # silence up to the stream's start
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(info.path),
           "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate)] + timeline + ["-f", "f32le", "-"]
    result = subprocess.run(cmd, capture_output=True)
    wav = np.frombuffer(result.stdout, np.float32).copy()
    if wav.size == 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise DubberError(f"audio could not be decoded ({message[-1] if message else 'no samples'})", path)
    if info.duration > 0 and info.path.suffix.lower() in {".mp4", ".m4a", ".mov", ".m4v", ".3gp"}:
        # AAC in MP4/M4A decodes with the encoder's end padding (up to 1024 samples: 64 ms at 16 kHz,
        # more than a frame). These containers store the exact length (other formats may only
        # estimate it from the bitrate); ffmpeg prints it truncated to 10 ms: take the middle.
        wav = wav[:int(np.ceil((info.duration + 0.005) * sample_rate))]
    if video_timeline and info.has_video:
        wav = wav[int(round(video_start(info.path) * sample_rate)):]
    return wav


_PTS_TIME_RE = re.compile(r"pts_time:\s*(-?\d+(?:\.\d+)?)")


def video_start(path: PathLike) -> float:
    """Seconds from the start of the file's timeline to its first video frame (0 for most files;
    more when the picture was muxed with a delay): one frame decoded."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-frames:v", "1",
           "-vf", "showinfo", "-f", "null", "-"]
    match = _PTS_TIME_RE.search(subprocess.run(cmd, capture_output=True, text=True, errors="replace").stderr)
    return max(0.0, float(match.group(1))) if match else 0.0


def copy_start(path: PathLike, seconds: float, out: PathLike) -> Path:
    """The first `seconds` of a video's first video and audio streams into `out`, without
    re-encoding (a stream copy: it ends on the packet at or after `seconds`)."""
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
                             "-t", f"{seconds:.3f}", "-map", "0:v:0", "-map", "0:a:0", "-c", "copy", str(out)],
                            capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise DubberError(f"could not copy its first {seconds:g} s ({lines[-1] if lines else 'ffmpeg failed'})", path)
    return Path(out)


@contextlib.contextmanager
def mixed_audio(paths: Sequence[PathLike]):
    """Yield a temporary WAV of the audio of `paths` mixed (as long as the longest; levels kept,
    not divided by the number of tracks: speakers mostly take turns). Removed afterwards."""
    fd, tmp = tempfile.mkstemp(prefix="dubber-mix-", suffix=".wav")
    os.close(fd)
    try:
        inputs = [arg for path in paths for arg in ("-i", str(check_input(path)))]
        n = len(paths)
        for mix in (f"amix=inputs={n}:duration=longest:normalize=0",  # ffmpeg >= 5
                    f"amix=inputs={n}:duration=longest,volume={n}"):  # older: amix divides by n
            result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *inputs,
                                     "-filter_complex", mix, "-ac", "2", "-c:a", "pcm_s16le", tmp],
                                    capture_output=True, text=True, errors="replace")
            if result.returncode == 0:
                break
        else:
            lines = result.stderr.strip().splitlines()
            raise DubberError(f"could not mix the speech tracks ({lines[-1] if lines else 'ffmpeg failed'})", paths[0])
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output(path: PathLike, inputs: Sequence[PathLike] = (), overwrite: bool = False) -> Path:
    """Refuse outputs that would destroy an input, replace a file unasked, or cannot be written."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise DubberError("output would overwrite an input", path)
    if path.exists() and not overwrite:
        raise DubberError("output exists (use --overwrite to replace it)", path)
    if path.is_dir():
        raise DubberError("output is a folder", path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DubberError(f"cannot create output folder ({exc.strerror})", folder) from exc
    if not folder.is_dir():
        raise DubberError("output folder is a file, not a folder", folder)
    if not os.access(folder, os.W_OK):
        raise DubberError("output folder is not writable", folder)
    return path


@contextlib.contextmanager
def atomic_output(path: PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{PARTIAL}{path.suffix}", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished output gets the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_partials(paths: Iterable[PathLike]) -> None:
    """Delete the temporaries atomic_output left beside these outputs: a process killed mid-write
    (a batch worker that died) cannot remove its own. One listing per folder."""
    by_folder: dict = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, set()).add((path.stem, path.suffix))
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if (m := _PARTIAL_NAME.match(e.name)) and (m["stem"], m["suffix"]) in names]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class VideoWriter:
    """Encode BGR frames to H.264 (yuv420p unless pixel_format says otherwise) + AAC from
    `audio_path`, cut to `duration` seconds.

    Use as a context manager; frames go through `write(frame)`. Odd sizes are padded by one pixel
    (yuv420p needs even sides) rather than resampled, so pixels stay where they were.
    """

    def __init__(self, path: PathLike, fps: float, width: int, height: int,
                 audio_path: Optional[PathLike] = None, duration: Optional[float] = None, crf: int = VIDEO_CRF,
                 pixel_format: str = "yuv420p", preset: str = VIDEO_PRESET):
        self.path = Path(path)
        self.crf, self.pixel_format, self.preset = crf, pixel_format, preset
        self.fps, self.width, self.height = fps, width, height
        self.audio_path, self.duration = audio_path, duration
        self.frames_written = 0
        self._yuv = pixel_format == PIPE_YUV and _even(width, height)  # frames cross the pipe as I420
        self._proc = None
        self._err = None

    def __enter__(self) -> "VideoWriter":
        rate = Fraction(self.fps).limit_denominator(1001)
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", PIPE_YUV if self._yuv else "bgr24", "-s", f"{self.width}x{self.height}",
               "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "-"]
        if self.audio_path is not None:
            cmd += ["-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0",
                    "-c:a", "aac", "-b:a", AUDIO_BITRATE]
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", self.preset,
                "-crf", str(self.crf), "-sws_flags", SWS_FLAGS, "-pix_fmt", self.pixel_format,
                "-movflags", "+faststart"]
        if self.duration is not None:
            cmd += ["-t", f"{self.duration:.6f}"]
        cmd += ["-f", "mp4", str(self.path)]
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self._err)
        return self

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not match {self.height}x{self.width} uint8")
        if self._yuv:
            import cv2

            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            raise DubberError(f"video encoder stopped: {self._stderr()}", self.path) from None
        self.frames_written += 1

    def _stderr(self) -> str:
        self._err.seek(0)
        lines = self._err.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "unknown error"

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self._proc.wait()
        message = self._stderr()
        self._err.close()
        if exc_type is None and code != 0:
            raise DubberError(f"video encoding failed: {message}", self.path)


def list_media(folder: PathLike, kinds: str = "any") -> List[Path]:
    """Files in `folder` (not recursive, sorted) that look like media by extension."""
    video = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".flv", ".m4v"}
    audio = {".wav", ".mp3", ".m4a", ".flac", ".ogg", ".aac", ".opus"}
    wanted = {"face": video | IMAGE_EXTENSIONS, "audio": audio | video, "any": video | audio | IMAGE_EXTENSIONS}[kinds]
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in wanted)
