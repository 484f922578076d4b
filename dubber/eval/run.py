"""`dubber eval`: the seed papers' reconstruction protocol, on the same pipeline core as `lipsync`.

For every clip the real video is the target. Each system produces a video of the clip's length:

  ground_truth   the real video (the ceiling);
  static_frame   the first frame repeated (a model that does not beat it is not lip syncing);
  shifted_audio  the real video judged against its audio delayed by SHIFT_SECONDS (sync must drop);
  <backbone>     `pipeline.lipsync` driven by the clip's own audio, from the clip's own frames
                 (video mode) or from its first frame as a photo (photo mode);
  <backbone>:dub (with dub=True) the clip driven by the next clip's speech: its sync is measured
                 against the new speech and, for contrast, against the clip's original speech.

Every system's frames are aligned with the same RSA alignment as the pipeline (landmarks found
in the system's own frames, at the real face's box) and compared frame by frame with the real
ones. Metrics are defined in dubber.eval.metrics and dubber.eval.sync (with the expert of dubber.backbones.syncnet).
The mouth metrics cut every system's aligned crop at the same box, the real mouth's in that frame.
Beside the table the eval keeps what its report (dubber.eval.report) shows: per clip the mouth
opening series and sync-offset curves (series/<clip>.json) and the real and generated videos.
"""

import csv
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from dubber import audio, media
from dubber.data import grid_alignment, read_alignment, words_in_run
from dubber.errors import DubberError
from dubber.eval import metrics
from dubber.face.crops import CROP_FACE, CropSpec
from dubber.face.align import crop_transforms, transform_points, warp_crop
from dubber.face.landmarks import mouth_aperture, predict_landmarks
from dubber.face.track import track_faces

METRIC_CROP = CropSpec(CROP_FACE, 128)  # PSNR / SSIM / CPBD / LMD and the mouth metrics are taken on these crops
SHIFT_SECONDS = 0.5
# A backbone that renders from the video's own mouths (dubber.backbones.rewrite) builds its bank from
# the clip being scored, whose mouth at each moment is the answer: the frames within this many
# seconds of the one being dubbed are kept out of its retrieval (longer than a syllable, ~0.25 s).
BANK_EXCLUDE_SECONDS = 0.4
SHEET_FRAMES = 6  # frames per row of a contact sheet
MOUTH_SHEETS = "mouths"  # sheets/<this>/<clip>.png: the zoomed mouth sheets (a folder: sheets/*.png stay as they were)
MOUTH_SHEET_ZOOM = 4  # mouth boxes enlarged this many times, nearest neighbour: pixels (and blur) as they are
MOUTH_SHEET_GAP = 2  # pixels between tiles
MOUTH_SHEET_LABEL = 16  # pixels of black above each tile for its label (white text on lips is unreadable)
DATASETS = ("grid", "lrw", "folder")
BASELINES = ("ground_truth", "static_frame", "shifted_audio")
COLUMNS = ("psnr", "ssim", "cpbd", "lmd", "lmd_mean_mouth", "lse_d", "lse_c", "lse_d0", "lse_c0", "sync_offset",
           "offset_accuracy", "offset_accuracy_speech", "av_corr", "av_best_corr", "av_best_lag",
           "lse_c0_original", "av_corr_original", "fps_model", "fps_end_to_end",
           "mouth_corr", "mouth_psnr", "mouth_sharpness", "mouth_sharpness_ratio", "silence_opening",
           "silence_opening_real", "mouth_flicker", "word_accuracy")
TABLE_NOTE = ("lse_d / lse_c: Wav2Lip's, at the best audio offset within +-15 frames, so a shift inside that "
              "range is found and forgiven (it shows in sync_offset); lse_d0 / lse_c0: at the delivered alignment; "
              "word_accuracy (GRID clips, which carry word alignments): the lip reader's share of words read right; "
              "lmd_mean_mouth (static_frame): the LMD of each clip's real mean mouth held still.")


@dataclass
class Clip:
    path: Path
    name: str


def list_clips(dataset: str, root: Path, split: Optional[Path] = None, limit: Optional[int] = None,
               min_seconds: float = 0.0) -> List[Clip]:
    """Clips of a dataset layout (see module docstring of the CLI); `split` is a list file or a CSV
    with file,split; clips shorter than min_seconds are left out (before `limit`)."""
    root = Path(root)
    if not root.is_dir():
        raise DubberError("dataset root not found", root)
    if split is not None:
        files = _split_files(Path(split), root)
    elif dataset == "grid":
        from dubber.data import grid_split

        files = grid_split(root)["val"]
    elif dataset == "lrw":
        files = sorted(root.glob("*/test/*.mp4"))
    elif dataset == "folder":
        files = [p for p in media.list_media(root, "face") if p.suffix.lower() not in media.IMAGE_EXTENSIONS]
    else:
        raise DubberError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if min_seconds > 0:
        files = [p for p in files if _duration(p) >= min_seconds]
    if limit:
        files = files[:limit]
    if not files:
        raise DubberError(f"no {dataset} clips found", root)
    return [Clip(p, f"{p.parent.name}_{p.stem}") for p in files]


def _duration(path: Path) -> float:
    """Seconds of a clip; infinite where it cannot be read (kept: scoring reports it as failed)."""
    try:
        return media.probe(path).duration or float("inf")
    except DubberError:
        return float("inf")


def _split_files(split: Path, root: Path) -> List[Path]:
    if split.suffix.lower() == ".csv":
        with open(split, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "file" not in rows[0]:
            raise DubberError("split CSV needs a 'file' column (and optionally 'split')", split)
        files = [split.parent / r["file"] for r in rows
                 if r.get("split", "val") == "val" and r.get("audio", "yes") == "yes" and r.get("audio_silent", "no") != "yes"]
    else:
        files = [root / line.strip() for line in split.read_text().splitlines() if line.strip()]
    return [f for f in files if f.exists()]


@dataclass
class Speech:
    """A speech track at a clip's frame times: envelope [n], mel windows [n, 80, 16] (None without an expert)."""

    envelope: np.ndarray
    mels: Optional[np.ndarray]


@dataclass
class SystemVideo:
    """One system's output for a clip: frames BGR [n], the speech it was driven by, timing."""

    frames: List[np.ndarray]
    speech: Speech
    original_speech: Optional[Speech] = None  # for dubbing: the clip's own speech, to contrast
    model_seconds: float = 0.0
    seconds: float = 0.0
    path: Optional[Path] = None  # the generated mp4, for the report


def _decode(path: Path) -> List[np.ndarray]:
    return [f.copy() for f in media.VideoReader(media.probe(path))]


def _shift(wav: np.ndarray, seconds: float) -> np.ndarray:
    pad = int(round(seconds * audio.SAMPLE_RATE))
    return np.concatenate([np.zeros(pad, np.float32), wav[:-pad]]) if pad else wav


def _fit(wav: np.ndarray, samples: int) -> np.ndarray:
    return wav[:samples] if len(wav) >= samples else np.pad(wav, (0, samples - len(wav)))


class Evaluator:
    """Scores systems on clips; holds the sync expert and the pipeline options."""

    def __init__(self, backbones: Sequence[str], mode: str = "video", sync_expert=None,
                 device: str = "auto", dub: bool = False, log: Callable[[str], None] = lambda m: None,
                 mouth_bank_source: Optional[Path] = None):
        if mode not in ("video", "photo"):
            raise DubberError(f"unknown eval mode {mode!r}; choose video or photo")
        self.backbones, self.mode, self.sync_expert = list(backbones), mode, sync_expert
        self.device, self.dub, self.log = device, dub, log
        # The backbones' lips replaced from this video's mouths (dubber.mouthbank): another video
        # of the person, never the clips scored (their own mouths are the answer).
        self.mouth_bank_source = mouth_bank_source
        self._lip_reader = None  # loaded for the first clip with word alignments (GRID's)
        if mode == "photo" and mouth_bank_source is None:
            from dubber.backbones import available

            for name in self.backbones:
                if getattr(available().get(name), "returns_points", False):
                    raise DubberError(f"backbone {name!r} renders the person's own mouths from a video: it has no "
                                      "photo mode (evaluate it with --mode video, or give --mouth-bank-source)")

    def systems(self) -> List[str]:
        names = list(BASELINES) + self.backbones
        return names + [f"{b}:dub" for b in self.backbones] if self.dub else names

    # -- producing each system's video ---------------------------------------------------------

    def _generate(self, backbone: str, clip: Clip, fps: float, audio_path: Path, speech: Speech,
                  workdir: Path, n: int, system: str) -> SystemVideo:
        from dubber.pipeline import LipsyncOptions, lipsync

        options = LipsyncOptions(backbone=backbone, device=self.device, fps=fps, overwrite=True,
                                 mouth_bank_source=self.mouth_bank_source,
                                 mouth_bank_exclude=BANK_EXCLUDE_SECONDS if self.mouth_bank_source is None else 0.0)
        face = clip.path
        if self.mode == "photo":
            face = workdir / f"{clip.path.stem}_first.png"
            media.write_image(face, next(iter(media.VideoReader(media.probe(clip.path), count=1))))
        out = workdir / f"{clip.path.stem}_{system.replace(':', '_')}.mp4"  # one file per system: the report keeps them
        summary = lipsync(face, audio_path, out, options)
        frames = _decode(out)[:n]
        frames += [frames[-1]] * (n - len(frames))
        return SystemVideo(frames, speech, model_seconds=summary.model_seconds, seconds=summary.seconds, path=out)

    # -- scoring -------------------------------------------------------------------------------

    def _landmarks(self, frames: List[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        import cv2

        out = np.full((len(frames), 68, 2), np.nan, np.float32)
        for t, frame in enumerate(frames):
            if not np.isnan(boxes[t, 0]):
                out[t] = predict_landmarks(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), boxes[t])
        return out

    def _word_accuracy(self, frames: List[np.ndarray], landmarks: np.ndarray, words) -> float:
        """The share of `words` [(first frame, end frame, word)] the lip reader (weights/lipreader.pt)
        reads right in the lips crops cut from frames (BGR) at landmarks; words over a faceless
        frame are left out (NaN when none is left)."""
        from dubber.backbones import load
        from dubber.backbones.lipreader import MOUTH_CROP, read_words, word_frames

        if self._lip_reader is None:
            self._lip_reader = load("lipreader")
        transforms = crop_transforms(landmarks, MOUTH_CROP)
        picks = [(word_frames(first, end), word) for first, end, word in words]
        picks = [(ts, word) for ts, word in picks if not np.isnan(transforms[ts, 0, 0]).any()]
        if not picks:
            return math.nan
        mouths = np.stack([[warp_crop(frames[t], transforms[t], MOUTH_CROP.size)[..., ::-1] for t in ts]
                           for ts, _ in picks])
        read = read_words(self._lip_reader, mouths)
        return float(np.mean([got == word for got, (_, word) in zip(read, picks)]))

    def _speech(self, wav: np.ndarray, n: int, fps: float) -> Speech:
        from dubber.eval.sync import frame_audio

        mels, envelope, _ = frame_audio(wav, n, fps, mels=self.sync_expert is not None)
        return Speech(envelope, mels)

    def _sync(self, frames, landmarks, speech: Speech, fps, valid, traces: Optional[dict] = None) -> Dict[str, float]:
        """Sync scores; `traces` (a dict) receives the curves behind them: high_pass (aperture,
        envelope, r at lag 0) and, with the expert, offset_curve ([O], metrics.lse)."""
        result: Dict[str, float] = {}
        loudness, mels = speech.envelope, speech.mels
        aperture = mouth_aperture(landmarks[valid])
        env = loudness[valid]
        corr = metrics.aperture_envelope_sync(aperture, env, fps)
        result.update(av_corr=corr.corr_at_zero, av_best_corr=corr.best_corr, av_best_lag=corr.best_lag)
        if traces is not None:
            window = max(3, int(round(metrics.HIGH_PASS_SECONDS * fps)) | 1)
            traces["high_pass"] = (metrics.high_pass(aperture, window), metrics.high_pass(env, window), corr.corr_at_zero)
        if self.sync_expert is not None:
            from dubber.eval.sync import mouth_crops, sync_scores

            # Faceless frames (NaN landmarks) stay out of the fit and its smoothing; their crops are
            # black, and the scores only count windows over frames with a face (speech & valid).
            mouths = mouth_crops(frames, np.where(valid[:, None, None], landmarks, np.nan))
            speech = audio.speech_frames(loudness)
            scores = sync_scores(self.sync_expert, mouths, mels, speech=speech & valid)
            result.update(lse_d=scores["lse_d"], lse_c=scores["lse_c"], lse_d0=scores["lse_d0"],
                          lse_c0=scores["lse_c0"], sync_offset=scores["offset"],
                          offset_accuracy=scores["offset_accuracy"],
                          offset_accuracy_speech=scores["offset_accuracy_speech"])
            if traces is not None:
                traces["offset_curve"] = scores["curve"]
        return result

    def score_clip(self, clip: Clip, workdir: Path, sheet_dir: Optional[Path] = None,
                   next_clip: Optional[Clip] = None, report_dir: Optional[Path] = None) -> List[Dict[str, object]]:
        """One row of metrics per system; with report_dir (the eval folder) also keeps the clip's
        series and videos there for dubber.eval.report."""
        info = media.probe(clip.path)
        if not (info.has_video and info.has_audio):
            raise DubberError("evaluation clips need video and audio", clip.path)
        if self.mouth_bank_source is not None and media.file_sha256(self.mouth_bank_source) == media.file_sha256(clip.path):
            raise DubberError("is the mouth bank's own source: its mouths are the answer being scored", clip.path)
        fps = info.fps
        real = _decode(clip.path)
        n = len(real)
        wav = _fit(audio.load_audio(clip.path), int(round(n / fps * audio.SAMPLE_RATE)))
        track = track_faces(real)
        valid = track.valid
        if valid.sum() < 10:
            raise DubberError("face found in fewer than 10 frames", clip.path)
        boxes = np.where(valid[:, None], track.boxes, track.boxes[np.argmax(valid)])
        own = self._speech(wav, n, fps)
        alignment = grid_alignment(clip.path)
        words = words_in_run(read_alignment(alignment), fps, 0, n) if alignment is not None else []
        videos: Dict[str, SystemVideo] = {
            "ground_truth": SystemVideo(real, own),
            "static_frame": SystemVideo([real[int(np.argmax(valid))]] * n, own),
            "shifted_audio": SystemVideo(real, self._speech(_shift(wav, SHIFT_SECONDS), n, fps)),
        }
        dubbing = self.dub and next_clip is not None and bool(self.backbones)
        if dubbing:
            driving_wav = _fit(audio.load_audio(next_clip.path), len(wav))
            driving = workdir / f"{clip.path.stem}_driving.wav"
            _write_wav(driving, driving_wav)
            driving_speech = self._speech(driving_wav, n, fps)
        for backbone in self.backbones:
            videos[backbone] = self._generate(backbone, clip, fps, clip.path, own, workdir, n, backbone)
            if dubbing:
                dubbed = self._generate(backbone, clip, fps, driving, driving_speech, workdir, n, f"{backbone}:dub")
                dubbed.original_speech = own
                videos[f"{backbone}:dub"] = dubbed
        real_lm = track.landmarks
        real_m = crop_transforms(real_lm, METRIC_CROP)
        real_crops = [warp_crop(f, m, METRIC_CROP.size) if ok else None for f, m, ok in zip(real, real_m, valid)]
        idx = np.flatnonzero(valid)
        real_points = np.stack([transform_points(real_lm[i], real_m[i]) for i in idx])  # in the real crops
        # One mouth box per frame, the real mouth's, for every system: they are judged on the same pixels.
        mouth_boxes = np.zeros((n, 4), np.int64)
        mouth_boxes[idx] = metrics.mouth_box(real_points, real_crops[idx[0]].shape)
        real_opening = mouth_aperture(np.where(valid[:, None, None], real_lm, np.nan))  # NaN without a face
        real_sharpness = metrics.mouth_sharpness([_gray(real_crops[i]) for i in idx], mouth_boxes[idx])
        rows, sheet, curves, openings, offset_curves = [], [], {}, {}, {}
        for name, video in videos.items():
            row: Dict[str, object] = {"clip": clip.name, "system": name, "frames": n}
            lm = real_lm if video.frames is real else (
                np.repeat(real_lm[np.argmax(valid)][None], n, 0) if name == "static_frame" else self._landmarks(video.frames, boxes))
            lm = np.where(valid[:, None, None], lm, np.nan)
            m = crop_transforms(lm, METRIC_CROP)
            crops = [warp_crop(f, t, METRIC_CROP.size) if ok else None for f, t, ok in zip(video.frames, m, valid)]
            opening = mouth_aperture(lm)
            if not name.endswith(":dub"):  # a dub speaks other words: its frames are not the real ones
                row["psnr"] = float(np.mean([metrics.psnr(crops[i], real_crops[i], cap_db=metrics.PSNR_CAP_DB)
                                             for i in idx]))
                row["ssim"] = float(np.mean([metrics.ssim(crops[i], real_crops[i]) for i in idx]))
                row["lmd"] = metrics.mouth_landmark_distance(
                    np.stack([transform_points(lm[i], m[i]) for i in idx]), real_points)
                if name == "static_frame":  # the still frame's mouth is one moment's; the best still mouth
                    row["lmd_mean_mouth"] = metrics.mean_mouth_distance(real_points)
                row["mouth_corr"] = metrics.mouth_opening_correlation(opening, real_opening)
                row["mouth_psnr"] = metrics.mouth_psnr([crops[i] for i in idx], [real_crops[i] for i in idx],
                                                       mouth_boxes[idx])
                if words:
                    row["word_accuracy"] = self._word_accuracy(video.frames, lm, words)
            row["cpbd"] = float(np.mean([metrics.cpbd(_gray(crops[i])) for i in idx[::3]]))
            row["mouth_sharpness"] = metrics.mouth_sharpness([_gray(crops[i]) for i in idx], mouth_boxes[idx])
            row["mouth_flicker"] = metrics.mouth_flicker([crops[i] for i in idx], mouth_boxes[idx], idx)
            row["mouth_sharpness_ratio"] = row["mouth_sharpness"] / real_sharpness if real_sharpness > 0 else math.nan
            # Silence of the speech that drives this system (a dub's: the new speech).
            speech = audio.speech_frames(video.speech.envelope)
            row["silence_opening"] = metrics.silence_mean(opening, speech)
            if video.original_speech is None:  # in a dub's pauses the real mouth speaks its own words: no reference
                row["silence_opening_real"] = metrics.silence_mean(real_opening, speech)
            traces: dict = {}
            row.update(self._sync(video.frames, lm, video.speech, fps, valid, traces))
            if name != "static_frame":
                curves[name] = traces["high_pass"]
            if name != "shifted_audio":  # the real frames again
                openings[name] = opening
            if "offset_curve" in traces and name != "static_frame":  # a still mouth has no offset to find
                offset_curves[name] = traces["offset_curve"]
            if video.original_speech is not None:
                original = self._sync(video.frames, lm, video.original_speech, fps, valid)
                row["lse_c0_original"] = original.get("lse_c0", math.nan)
                row["av_corr_original"] = original["av_corr"]
            if video.seconds:
                row["fps_model"] = n / video.model_seconds if video.model_seconds else math.nan
                row["fps_end_to_end"] = n / video.seconds
            rows.append(row)
            sheet.append((name, crops))
        if sheet_dir is not None:
            _contact_sheet(sheet_dir / f"{clip.name}.png", sheet, valid)
            _mouth_sheet(sheet_dir / MOUTH_SHEETS / f"{clip.name}.png", sheet, mouth_boxes, valid)
            _sync_plot(sheet_dir / f"{clip.name}_sync.png", curves)
        if report_dir is not None:
            from dubber.eval import report

            speech = {"own": audio.speech_frames(own.envelope)}
            if dubbing:
                speech["driving"] = audio.speech_frames(driving_speech.envelope)
            report.keep_clip(report_dir, clip.name, clip.path, fps, real, speech, openings, offset_curves,
                             {name: v.path for name, v in videos.items() if v.path is not None},
                             next_clip.name if dubbing else None)
        return rows


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _write_wav(path: Path, wav: np.ndarray) -> None:
    import wave

    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(audio.SAMPLE_RATE)
        handle.writeframes((np.clip(wav, -1, 1) * 32767).astype(np.int16).tobytes())


def _label(image: np.ndarray, text: str) -> np.ndarray:
    import cv2

    out = image.copy()
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _sheet_frames(valid: np.ndarray) -> np.ndarray:
    """SHEET_FRAMES frame indices spread evenly over the frames with a face: valid bool [n] -> int [SHEET_FRAMES]."""
    idx = np.flatnonzero(valid)
    return idx[np.linspace(0, len(idx) - 1, SHEET_FRAMES).round().astype(int)]


def _contact_sheet(path: Path, rows, valid) -> None:
    """Rows: systems; columns: SHEET_FRAMES aligned face crops, then the same frames' mouths enlarged."""
    import cv2

    picks = _sheet_frames(valid)
    size = METRIC_CROP.size
    lines = []
    for name, crops in rows:
        faces = [crops[i] for i in picks]
        mouths = [cv2.resize(c[size // 2:, size // 8: size - size // 8], (size, size * 2 // 3)) for c in faces]
        faces[0] = _label(faces[0], name)
        lines.append(np.hstack(faces))
        lines.append(np.hstack(mouths))
    path.parent.mkdir(parents=True, exist_ok=True)
    media.write_image(path, np.vstack(lines))


def _mouth_sheet(path: Path, rows, boxes: np.ndarray, valid: np.ndarray) -> None:
    """Rows: SHEET_FRAMES frames; columns: the real mouth, each generated one (and its dub), the
    still frame's, each cut from its aligned crop at that frame's real mouth box (boxes [n,4]) and
    zoomed MOUTH_SHEET_ZOOM times. The shifted-audio system shows the real frames again, so it is left out."""
    import cv2

    shown = ([r for r in rows if r[0] == "ground_truth"] + [r for r in rows if r[0] not in BASELINES]
             + [r for r in rows if r[0] == "static_frame"])
    picks = _sheet_frames(valid)
    sizes = boxes[picks, 2:] - boxes[picks, :2]  # [SHEET_FRAMES, 2] (width, height)
    width, height = sizes.max(axis=0) * MOUTH_SHEET_ZOOM + MOUTH_SHEET_GAP
    height += MOUTH_SHEET_LABEL
    lines = []
    for t in picks:
        tiles = []
        for name, crops in shown:
            mouth = cv2.resize(metrics.cut_box(crops[t], boxes[t]), None, fx=MOUTH_SHEET_ZOOM, fy=MOUTH_SHEET_ZOOM,
                               interpolation=cv2.INTER_NEAREST)
            tile = np.zeros((height, width, 3), np.uint8)  # boxes differ in size between frames: pad, never rescale
            tile[MOUTH_SHEET_LABEL:MOUTH_SHEET_LABEL + mouth.shape[0], :mouth.shape[1]] = mouth
            tiles.append(_label(tile, f"{name} f{t}"))
        lines.append(np.hstack(tiles))
    path.parent.mkdir(parents=True, exist_ok=True)
    media.write_image(path, np.vstack(lines))


def _sync_plot(path: Path, curves: Dict[str, tuple]) -> None:
    """One panel per system: mouth aperture (green) over the speech envelope (white), both
    high-passed as in metrics.aperture_envelope_sync and standardised, with r at lag 0."""
    width, height = 900, 110
    panels = []
    for name, (aperture, envelope, r) in curves.items():
        panel = np.zeros((height, width, 3), np.uint8)
        _polyline(panel, envelope, (255, 255, 255))
        _polyline(panel, aperture, (80, 220, 80))
        panels.append(_label(panel, f"{name}  r(lag 0) = {r:.2f}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    media.write_image(path, np.vstack(panels))


def _polyline(panel: np.ndarray, signal: np.ndarray, colour) -> None:
    import cv2

    h, w = panel.shape[:2]
    s = np.asarray(signal, np.float64)
    s = (s - np.nanmean(s)) / (np.nanstd(s) + 1e-9)
    xs = np.linspace(0, w - 1, len(s))
    ys = np.clip(h / 2 - s * h / 6, 0, h - 1)
    points = np.stack([xs, ys], 1).round().astype(np.int32)
    cv2.polylines(panel, [points], False, colour, 1, cv2.LINE_AA)


def summarise(rows: List[Dict[str, object]], systems: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean of every metric per system over clips (NaNs ignored)."""
    summary = {}
    for system in systems:
        chosen = [r for r in rows if r["system"] == system]
        if not chosen:
            continue
        summary[system] = {"clips": len(chosen)}
        for column in COLUMNS:
            values = [float(r[column]) for r in chosen if column in r and not math.isnan(float(r[column]))]
            if values:
                summary[system][column] = float(np.mean(values))
    return summary


def load_sync_expert(path: Optional[Path] = None):
    """The project's trained SyncNet (weights/syncnet.pt by default), in eval mode on the CPU."""
    from dubber.backbones import load, weights_path

    path = Path(path) if path else weights_path("syncnet")
    if not path.is_file():
        raise DubberError("no sync expert weights (train with `dubber train --backbone syncnet`, "
                          "or pass --no-sync-expert to skip LSE-D/LSE-C)", path)
    return load("syncnet", path)


def evaluate(clips: Sequence[Clip], out_dir: Path, backbones: Sequence[str] = (), mode: str = "video",
             sync_expert=None, device: str = "auto", dub: bool = False, sheets: bool = True,
             log: Callable[[str], None] = lambda m: None,
             on_clip: Optional[Callable[[int], None]] = None, report: bool = True,
             mouth_bank_source: Optional[Path] = None) -> Dict[str, Dict[str, float]]:
    """Score every clip, write clips.csv, summary.json, the sheets and (with `report`) report.html
    with its series and videos (dubber.eval.report); return the per-system summary.
    mouth_bank_source: dub the backbones with the mouth bank of this video (not one of the clips)."""
    from dubber.eval import report as report_module

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(backbones, mode, sync_expert, device, dub, log, mouth_bank_source)
    if sheets:  # an earlier run's mouth sheets, so none of a clip this run does not score stays
        for stale in (out_dir / "sheets" / MOUTH_SHEETS).glob("*.png"):
            stale.unlink()
    if report:
        report_module.clear(out_dir)
    rows: List[Dict[str, object]] = []
    failures = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dubber-eval-") as tmp:
        for k, clip in enumerate(clips):
            next_clip = clips[(k + 1) % len(clips)] if len(clips) > 1 else None
            try:
                rows += evaluator.score_clip(clip, Path(tmp), out_dir / "sheets" if sheets else None, next_clip,
                                             out_dir if report else None)
            except DubberError as exc:
                failures.append({"clip": clip.name, "error": str(exc)})
                log(f"skipped {clip.name}: {exc}")
            if on_clip:
                on_clip(k)
    columns = ["clip", "system", "frames"] + list(COLUMNS)
    with media.atomic_output(out_dir / "clips.csv") as tmp_csv:
        with open(tmp_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    summary = summarise(rows, evaluator.systems())
    results = {"mode": mode, "clips": len(clips), "failed": failures, "seconds": time.perf_counter() - started,
               "metric_crop": f"{METRIC_CROP.kind} {METRIC_CROP.size}x{METRIC_CROP.size}",
               "shift_seconds": SHIFT_SECONDS, "systems": summary,
               "mouth_bank_source": None if mouth_bank_source is None else str(mouth_bank_source),
               "bank_exclude_seconds": BANK_EXCLUDE_SECONDS if mouth_bank_source is None else 0.0}
    with media.atomic_output(out_dir / "summary.json") as tmp_json:
        tmp_json.write_text(json.dumps(results, indent=2))
    if report:
        report_module.write_report(out_dir)
    return summary
