"""Test-only backbones, a CLI runner and small synthetic media for the end-to-end tests.

Importing this module registers two backbones that need no weights:

- ``identity`` returns the crops it is given, so a correct pipeline reproduces its input;
- ``shiftmouth`` rolls the lower half of each crop down, a visible change that may only appear
  where the paste-back mask lets it through.

Media are tiny on purpose (160x128 px, a second or two): the whole end-to-end suite must stay fast
on a two-core machine. Nothing here imports pytest, so `bench/bench_memory.py` can reuse it.
"""

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dubber import media
from dubber.backbones import CONDITION_NONE, CROP_FACE, Backbone, CropSpec, Generated, register
from dubber.face.align import TEMPLATE

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
EXAMPLES = REPO / "examples"
FACE_PHOTO = EXAMPLES / "face.jpg"
SPEECH = EXAMPLES / "speech.wav"
# Where dlib's HOG detector puts the face in examples/face.jpg (x0, y0, x1, y1), 512x512 photo.
PHOTO_FACE_BOX = (181.3, 78.9, 273.1, 170.7)

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# backbones


@register
class IdentityBackbone(Backbone):
    """Returns its input crops unchanged: the pipeline must then give back its input frames."""

    name = "identity"
    needs_weights = False
    conditioning = CONDITION_NONE

    def __init__(self, kind: str = CROP_FACE, size: int = 96):
        super().__init__()
        self.crop = CropSpec(kind, size)  # instance attribute: shadows the class default

    def forward(self, faces, mels, identity=None, state=None) -> Generated:
        return Generated(faces)


@register
class ShiftMouthBackbone(IdentityBackbone):
    """Rolls the lower half of each crop down by an eighth of its side: a change no blend can hide."""

    name = "shiftmouth"

    def forward(self, faces, mels, identity=None, state=None) -> Generated:
        size = faces.shape[-2]
        out = faces.clone()
        out[..., size // 2:, :] = torch.roll(faces[..., size // 2:, :], shifts=size // 8, dims=-2)
        return Generated(out)


@register
class CrashingBackbone(IdentityBackbone):
    """Fails on its second batch, after the encoder has already written frames: nothing may be left."""

    name = "crashing"

    def forward(self, faces, mels, identity=None, state=None) -> Generated:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 1:
            raise RuntimeError("simulated failure in the generator")
        return Generated(faces)


class ClockExpert(torch.nn.Module):
    """A fake sync expert whose embeddings are angles: a mouth window points at its middle frame's
    pixel value, an audio window at its mel value, so distances are smallest where the frames match."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    @staticmethod
    def _angle(value):
        return torch.stack([torch.cos(0.1 * value), torch.sin(0.1 * value)], dim=1)

    def embed_face(self, windows):
        return self._angle(windows[:, 3 * 2].mean(dim=(1, 2)) * 255)  # red channel of frame 2 of 5

    def embed_audio(self, mels):
        return self._angle(mels.mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------
# running the CLI


def run_cli(args: Sequence[PathLike]) -> Tuple[int, str, str]:
    """Run `dubber ARGS` in this process (so test backbones are visible): (exit code, stdout, stderr)."""
    from dubber.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv = ["dubber"] + [str(a) for a in args]
    os.environ["COLUMNS"] = "250"  # rich tables: no wrapping of file names
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    return code, out.getvalue(), err.getvalue()


def run_cli_subprocess(args: Sequence[PathLike], test_backbones: bool = False, module: bool = False,
                       timeout: float = 300, cwd: Optional[PathLike] = None) -> Tuple[int, str, str]:
    """Run dubber in a real process: the console script, `python -m dubber` (module=True), or the CLI
    with this module's backbones registered first (test_backbones=True)."""
    if test_backbones:
        boot = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import helpers; "
                "from dubber.cli import main; sys.argv[0] = 'dubber'; main()")
        cmd = [sys.executable, "-c", boot]
    elif module:
        cmd = [sys.executable, "-m", "dubber"]
    else:
        script = Path(sys.executable).with_name("dubber")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dubber"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    env.pop("DUBBER_DEBUG", None)
    result = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# media makers


def run_ffmpeg(args: List[str], stdin: Optional[bytes] = None) -> None:
    """ffmpeg quietly with `args`; raises with its stderr on failure (tests and benches)."""
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"] + args
    result = subprocess.run(cmd, input=stdin, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {' '.join(cmd)}\n{result.stderr.decode(errors='replace')}")


def _rate(fps: float) -> str:
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


def speech_like(seconds: float, rate: int = 16000, channels: int = 1, amplitude: float = 0.3,
                seed: int = 0) -> np.ndarray:
    """Voiced harmonics with a wandering pitch plus a little noise, opened and closed ~4 times a second
    like syllables, with short pauses: float32 [n, channels] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    f0 = 150 + 40 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    noise = rng.standard_normal(n) * 0.15
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 4.0 * t)
    pauses = (np.sin(2 * np.pi * 0.45 * t + 0.5) > -0.8).astype(float)
    signal = (voiced / 3 + noise) * syllables * pauses
    signal = amplitude * signal / max(np.abs(signal).max(), 1e-9)
    out = np.stack([np.roll(signal, 7 * c) * (1 - 0.1 * c / max(channels, 1)) for c in range(channels)], axis=1)
    return out.astype(np.float32)


def make_tone_speech(path: PathLike, seconds: float, rate: int = 16000, channels: int = 1,
                     amplitude: float = 0.3, seed: int = 0) -> Path:
    """Write speech-like audio (see `speech_like`; amplitude 0 gives digital silence) to `path`,
    in whatever format its extension names (wav: 16-bit PCM)."""
    path = Path(path)
    wav = speech_like(seconds, rate, channels, amplitude, seed) if amplitude > 0 else \
        np.zeros((int(round(seconds * rate)), channels), np.float32)
    codec = ["-c:a", "pcm_s16le"] if path.suffix.lower() == ".wav" else []
    run_ffmpeg(["-f", "f32le", "-ar", str(rate), "-ac", str(channels), "-i", "-"] + codec + [str(path)],
            stdin=wav.tobytes())
    return path


_PHOTO = None


def face_photo() -> np.ndarray:
    """examples/face.jpg as uint8 BGR [512, 512, 3] (cached)."""
    global _PHOTO
    if _PHOTO is None:
        _PHOTO = media.read_image(FACE_PHOTO)
    return _PHOTO


def face_transform(t: float, size: Tuple[int, int], motion: bool = True, face_scale: float = 0.42,
                   centre: Optional[Tuple[float, float]] = None, angle_deg: float = 0.0) -> np.ndarray:
    """Photo->frame affine [2, 3] at time t: the face ~face_scale of the frame's short side, moving and
    turning in-plane (±8°) over time when `motion`."""
    import cv2

    width, height = size
    x0, y0, x1, y1 = PHOTO_FACE_BOX
    src_centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    scale = face_scale * min(width, height) / (x1 - x0)
    cx, cy = centre or (width / 2, height * 0.45)
    angle = angle_deg
    if motion:
        cx += 0.07 * width * np.sin(2 * np.pi * t / 1.6)
        cy += 0.04 * height * np.sin(2 * np.pi * t / 1.1 + 1.0)
        angle += 8.0 * np.sin(2 * np.pi * t / 1.3)
        scale *= 1 + 0.05 * np.sin(2 * np.pi * t / 2.1)
    matrix = cv2.getRotationMatrix2D(src_centre, angle, scale)
    matrix[:, 2] += np.array([cx, cy]) - np.array(src_centre)
    return matrix


def marker_height(height: int) -> int:
    return max(8, height // 16)


def draw_marker(frame: np.ndarray, index: int, bits: int = 10) -> np.ndarray:
    """Write `index` in binary as black/white blocks along the bottom rows (frame-order check)."""
    h, w = frame.shape[:2]
    rows = marker_height(h)
    edges = np.linspace(0, w, bits + 1).round().astype(int)
    for b in range(bits):
        frame[h - rows:, edges[b]:edges[b + 1]] = 255 if (index >> b) & 1 else 0
    return frame


def read_marker(frame: np.ndarray, bits: int = 10) -> int:
    """Inverse of `draw_marker` on a decoded (lossy) frame."""
    h, w = frame.shape[:2]
    rows = marker_height(h)
    edges = np.linspace(0, w, bits + 1).round().astype(int)
    value = 0
    for b in range(bits):
        block = frame[h - rows + 2:h - 1, edges[b] + 2:edges[b + 1] - 2]
        value |= int(block.mean() > 127) << b
    return value


def face_frame(t: float, size: Tuple[int, int] = (160, 128), motion: bool = True, **kwargs) -> np.ndarray:
    """One composed frame: the example photo warped so its face sits in a `size` (w, h) frame."""
    import cv2

    matrix = face_transform(t, size, motion, **kwargs)
    return cv2.warpAffine(face_photo(), matrix, size, flags=cv2.INTER_AREA if matrix[0, 0] < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT101)


def two_faces_frame(second: bool = True) -> np.ndarray:
    """240x128: a large face on the left and (when `second`) a smaller one on the right."""
    frame = np.full((128, 240, 3), 90, np.uint8)
    frame[:, :128] = face_frame(0, (128, 128), motion=False)
    if second:
        frame[14:114, 134:234] = face_frame(0, (100, 100), motion=False)
    return frame


def make_frames(seconds: float, fps: float, size: Tuple[int, int] = (160, 128), motion: bool = True,
                marker: bool = True, blank: Iterable[int] = ()) -> Iterable[np.ndarray]:
    blank = set(blank)
    for i in range(int(round(seconds * fps))):
        frame = np.full((size[1], size[0], 3), 100, np.uint8) if i in blank else face_frame(i / fps, size, motion)
        yield draw_marker(frame, i) if marker else frame


def encode_frames(path: PathLike, frames: Iterable[np.ndarray], fps: float, audio: Optional[PathLike] = None,
                  crf: int = 18, faststart: bool = False, rotate: int = 0, extra: Sequence[str] = ()) -> Path:
    """H.264 yuv420p (+ AAC from `audio` when given) from BGR frames. `rotate` (90, 180, 270) stores the
    frames turned, with a display matrix (a phone's portrait video) so that a decoder applying it
    shows them as given."""
    import cv2

    path = Path(path)
    frames = list(frames)
    if rotate:
        # Which way ffmpeg's rotation tag turns the picture has changed between versions: store the
        # frames one way, check what a decoder shows, else the other way.
        turns = [cv2.ROTATE_180] if rotate == 180 else [cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_90_COUNTERCLOCKWISE]
        plain = path.with_name(f".{path.stem}.unrotated{path.suffix}")
        for turn in turns:
            try:
                encode_frames(plain, [cv2.rotate(f, turn) for f in frames], fps, audio, crf, faststart, 0, extra)
                set_rotation(plain, path, rotate)
            finally:
                plain.unlink(missing_ok=True)
            shown = next(iter(media.VideoReader(media.probe(path), count=1)))
            if shown.shape == frames[0].shape and psnr(shown, frames[0]) > 25:
                return path
        raise RuntimeError(f"could not write a rotated video that decodes upright ({media.ffmpeg_exe()})")
    h, w = frames[0].shape[:2]
    args = ["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-framerate", _rate(fps), "-i", "-"]
    if audio is not None:
        args += ["-i", str(audio), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "96k"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p"]
    if faststart:
        args += ["-movflags", "+faststart"]
    run_ffmpeg(args + list(extra) + [str(path)], stdin=b"".join(np.ascontiguousarray(f).tobytes() for f in frames))
    return path


def set_rotation(source: PathLike, target: PathLike, degrees: int) -> Path:
    """Remux `source` into `target` with a display matrix telling players to turn it `degrees` clockwise
    (a phone's portrait video). ffmpeg < 6 takes the `rotate` tag; newer ones `-display_rotation`
    (counter-clockwise) before the input."""
    attempts = [["-i", str(source), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}"],
                ["-display_rotation", str(-degrees), "-i", str(source), "-c", "copy"]]  # ffmpeg >= 6
    for args in attempts:
        try:
            run_ffmpeg(args + [str(target)])
        except RuntimeError:
            continue
        if media.probe(target).rotation:
            return Path(target)
    raise RuntimeError(f"this ffmpeg cannot write rotation metadata ({media.ffmpeg_exe()})")


def make_face_video(path: PathLike, seconds: float = 1.0, fps: float = 25.0, size: Tuple[int, int] = (160, 128),
                    motion: bool = True, audio: Union[None, bool, float, PathLike] = None, marker: bool = True,
                    blank: Iterable[int] = (), crf: int = 18, faststart: bool = False, rotate: int = 0) -> Path:
    """A video of the example face moving and turning (head motion), H.264 at `fps` (a float; 30000/1001
    for NTSC). audio: None/False none; True speech of the same length; a number: speech of that many
    seconds; a path: that file. `marker` writes each frame's index along the bottom rows; `blank`
    lists frames replaced by a flat grey (no face)."""
    path = Path(path)
    frames = make_frames(seconds, fps, size, motion, marker, blank)
    audio_file = None
    if audio is not None and audio is not False:
        if isinstance(audio, (str, Path)):
            audio_file = Path(audio)
        else:
            audio_file = path.with_name(f".{path.stem}.speech.wav")
            make_tone_speech(audio_file, seconds if audio is True else float(audio))
    try:
        return encode_frames(path, frames, fps, audio_file, crf, faststart, rotate)
    finally:
        if audio_file is not None and not isinstance(audio, (str, Path)):
            audio_file.unlink()


def write_image(path: PathLike, image: np.ndarray) -> Path:
    import cv2

    path = Path(path)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok, path
    data.tofile(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# measuring


def decode_frames(path: PathLike) -> List[np.ndarray]:
    """Every frame of a (small) video, uint8 BGR, at its own frame rate."""
    return list(media.VideoReader(media.probe(path)))


def psnr(a: np.ndarray, b: np.ndarray, box: Optional[Sequence[float]] = None) -> float:
    """PSNR in dB of two uint8 images (or stacks of them) over the whole image or over `box`
    (x0, y0, x1, y1) when given; inf when equal."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if box is not None:
        h, w = a.shape[-3:-1]
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
        a, b = a[..., y0:y1, x0:x1, :], b[..., y0:y1, x0:x1, :]
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def psnr_boxes(frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray], boxes: np.ndarray) -> float:
    """PSNR in dB over the union of per-frame regions: frame i of each stack restricted to boxes[i]
    (x0, y0, x1, y1); frames whose box is NaN (no face) are left out."""
    total, count = 0.0, 0
    for a, b, box in zip(frames_a, frames_b, boxes):
        if np.isnan(box[0]):
            continue
        h, w = a.shape[:2]
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
        d = a[y0:y1, x0:x1].astype(np.float64) - b[y0:y1, x0:x1]
        total, count = total + float((d ** 2).sum()), count + d.size
    if count == 0:
        raise ValueError("no frame has a box")
    return float("inf") if total == 0 else 10 * np.log10(255.0 ** 2 / (total / count))


def sha256(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(folder: PathLike) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def summary_counts(stderr: str) -> Optional[Tuple[int, int, int]]:
    """(frames, dubbed, without a face) from the CLI's summary line, or None."""
    import re

    match = re.search(r"(\d+) frames \((\d+) dubbed, (\d+) without a face\)", stderr)
    return tuple(int(g) for g in match.groups()) if match else None


def synthetic_box_clip(identity: str, frames: int, seed: int, size: int = 128, mel_width: int = 16) -> dict:
    """Box crops `size` px (a dark mouth whose height follows the low mel bands' energy, on a skin tone
    of its own) with matching mouth landmarks (eyes and nose where alignment puts them: the crop
    is the frame, its transforms the identity), in the layout of dubber.data.load_clips (crop key
    box<size>, mel windows of mel_width frames): for the recipes of full-face generators."""
    rng = np.random.default_rng(seed)
    key = f"box{size}"
    yy, xx = np.mgrid[0:size, 0:size] / size
    skin = rng.uniform(90, 220, 3)
    openness = np.clip(np.convolve(rng.uniform(0, 1, frames + 2), np.ones(3) / 3, "valid"), 0, 1)
    crops = np.empty((frames, size, size, 3), np.uint8)
    landmarks = np.zeros((frames, 68, 2), np.float32)
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    for t in range(frames):
        height = 0.03 + 0.08 * openness[t]
        image = np.tile(skin, (size, size, 1))
        image[(((xx - 0.5) / 0.15) ** 2 + ((yy - 0.72) / height) ** 2) < 1] = (40, 10, 20)
        crops[t] = image.astype(np.uint8)
        landmarks[t, 48:68] = size * np.stack([0.5 + 0.15 * np.cos(angles), 0.72 + height * np.sin(angles)], 1)
        landmarks[t, 36:42], landmarks[t, 42:48], landmarks[t, 30] = size * TEMPLATE  # the crop is the frame
    mels = np.full((frames, 80, mel_width), -4.0, np.float32)
    mels[:, :40] += 8 * openness[:, None, None].astype(np.float32)
    return {"crops": {key: crops}, "mels": mels, "identity": identity, "name": f"{identity}-{seed}",
            "speech": np.ones(frames, bool), "landmarks": landmarks,
            "transforms": {key: np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1))}}


def assert_resume_is_exact(recipe, clips, tmp_path: Path, steps: int = 3) -> None:
    """`steps` steps of `recipe` in one go leave the same state as steps - 1, then resumed to
    `steps` (the loop's per-step RNG and its saved state): every tensor of every module equal."""
    import torch

    from dubber.train.loop import checkpoint_path_for, train

    whole, split = tmp_path / "whole" / "m.pt", tmp_path / "split" / "m.pt"
    for path in (whole, split):
        path.parent.mkdir()
    train(recipe, clips, whole, steps, log=lambda message: None)
    train(recipe, clips, split, steps - 1, log=lambda message: None)
    assert checkpoint_path_for(split).is_file()
    train(recipe, clips, split, steps, log=lambda message: None)
    a, b = (torch.load(checkpoint_path_for(p), weights_only=True)["modules"] for p in (whole, split))
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
