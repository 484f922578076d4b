"""A portable training set: the clips dubber.data.load_clips gives, small enough to carry to a
borrowed GPU machine (tens of MB instead of the cache's GB) and read there without the analysis
dependencies (no dlib, librosa or ffmpeg binary: OpenCV decodes the video).

Layout of a pack folder:
  crops_<key>.mp4   every clip's crops of one CropSpec, clip after clip, H.264 4:4:4 at PACK_CRF
  clips.npz         per clip: name, identity, fps, length; per frame: the crop transforms, the
                    20 mouth landmarks (frame pixels), the speech flags and an offset into the
                    clip's mel segment; per clip a log-mel segment [N_MELS, columns] quantised to
                    uint8 (255 steps) over [audio.MEL_MIN, audio.MEL_MAX]
A pack holds the mouth's landmarks only (recipes that locate the mouth: MIA/AMIE's attention and
mouth loss, rewrite's shapes): it is for training steps, not for validation (which refits all 68).

    python -m dubber.train.pack --data ../shared/data --cache CACHE --offsets weights/offsets.csv \
        --crop box:128 --crop face:96 --images box:128 --grid-every 10 -o PACK
    dubber train --backbone dck --pack PACK --device cuda --minutes 7 --set init=weights/dck.pt
"""

from pathlib import Path
from typing import List, Sequence

import numpy as np

from dubber import audio
from dubber.errors import DubberError
from dubber.face.crops import CropSpec
from dubber.face.landmarks import MOUTH

PACK_CRF = 16  # x264 quality of the crop videos: about 2 grey levels off, ~0.5 kB a 128 px frame
PACK_PRESET = "slow"  # written once, carried often: smaller files are worth the encoding time
PACK_RATE = 25.0  # frames per second the crop videos claim; frames are indexed, never timed


def write_pack(clips: Sequence[dict], specs: Sequence[CropSpec], folder: Path, crop_keys: Sequence[str] = (),
               source: str = "") -> None:
    """Write clips (load_clips dicts holding `specs`, with their audio times) to `folder`. crop_keys:
    the specs whose crops are stored (default all); the transforms of every spec are stored.
    source: where the clips came from, for the meta of what is trained on the pack."""
    from dubber.media import VideoWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = [s.key for s in specs]
    crop_keys = list(crop_keys) or keys
    for key in crop_keys:
        size = clips[0]["crops"][key].shape[1]
        # 4:4:4: full-resolution colour (lip colour is what the model must learn)
        with VideoWriter(folder / f"crops_{key}.mp4", PACK_RATE, size, size, crf=PACK_CRF,
                         pixel_format="yuv444p", preset=PACK_PRESET) as writer:
            for clip in clips:
                for crop in clip["crops"][key]:
                    writer.write(crop[:, :, ::-1])  # RGB -> the writer's BGR
    segments, offsets = [], []
    for clip in clips:
        segment, offset = _mel_segment(clip["mels"], clip["times"])
        segments.append(_quantise(segment))
        offsets.append(offset)
    np.savez_compressed(folder / "clips.npz", source=np.array(source), names=np.array([c["name"] for c in clips]),
             identities=np.array([c["identity"] for c in clips]), fps=np.array([c["fps"] for c in clips]),
             lengths=np.array([len(c["mels"]) for c in clips]), keys=np.array(keys), crop_keys=np.array(crop_keys),
             mel_width=clips[0]["mels"].shape[-1], mel_offsets=np.concatenate(offsets).astype(np.int32),
             mel_columns=np.array([s.shape[1] for s in segments]), mels=np.concatenate(segments, axis=1),
             speech=np.concatenate([c["speech"] for c in clips]),
             mouths=np.concatenate([c["landmarks"][:, MOUTH] for c in clips]).astype(np.float32),
             **{f"transform_{k}": np.concatenate([c["transforms"][k] for c in clips]).astype(np.float32) for k in keys})


def read_pack(folder: Path) -> List[dict]:
    """Pack folder -> clip dicts as load_clips gives (crops, transforms, mels, speech, name,
    identity, fps; landmarks [N, 68, 2] with the mouth's 20 points and NaN elsewhere, when the pack
    holds them). Mels come back dequantised (float32)."""
    import cv2

    folder = Path(folder)
    meta = np.load(folder / "clips.npz")
    lengths = meta["lengths"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    crops = {}
    for key in meta["crop_keys"]:
        capture = cv2.VideoCapture(str(folder / f"crops_{key}.mp4"))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame[:, :, ::-1])
        if len(frames) != bounds[-1]:
            raise DubberError(f"the pack's {key} video holds {len(frames)} frames, not {bounds[-1]}", folder)
        crops[str(key)] = np.stack(frames)
    width = int(meta["mel_width"])
    mels = _dequantise(meta["mels"])
    columns = np.concatenate([[0], np.cumsum(meta["mel_columns"])])
    clips = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segment = mels[:, columns[i]:columns[i + 1]]
        index = meta["mel_offsets"][a:b, None] + np.arange(width)[None, :]
        clips.append({
            "name": str(meta["names"][i]), "identity": str(meta["identities"][i]), "fps": float(meta["fps"][i]),
            "crops": {k: v[a:b] for k, v in crops.items()},
            "transforms": {str(k): meta[f"transform_{k}"][a:b] for k in meta["keys"]},
            "mels": np.ascontiguousarray(segment[:, index].transpose(1, 0, 2)), "speech": meta["speech"][a:b]})
        if "mouths" in meta:  # packs written before session 10 hold none
            landmarks = np.full((b - a, 68, 2), np.nan, np.float32)
            landmarks[:, MOUTH] = meta["mouths"][a:b]
            clips[-1]["landmarks"] = landmarks
    return clips


def pack_source(folder: Path) -> str:
    """What write_pack was told the clips came from."""
    return str(np.load(Path(folder) / "clips.npz")["source"])


def _mel_segment(windows: np.ndarray, times_s: np.ndarray):
    """Windows [N, N_MELS, W] cut by audio.mel_windows at times_s [N] -> (the columns they span
    [N_MELS, C], each window's first column in it [N]): consecutive windows overlap, so the
    segment is a fraction of their size."""
    width = windows.shape[-1]
    starts = audio.mel_window_starts(times_s, width)
    offsets = starts - starts.min()
    segment = np.full((windows.shape[1], offsets.max() + width), audio.MEL_MIN, np.float32)
    for window, start in zip(windows, offsets):
        segment[:, start:start + width] = window
    return segment, offsets


def _quantise(mel: np.ndarray) -> np.ndarray:
    span = audio.MEL_MAX - audio.MEL_MIN
    return np.round((np.clip(mel, audio.MEL_MIN, audio.MEL_MAX) - audio.MEL_MIN) * (255 / span)).astype(np.uint8)


def _dequantise(mel: np.ndarray) -> np.ndarray:
    return (mel.astype(np.float32) * ((audio.MEL_MAX - audio.MEL_MIN) / 255) + audio.MEL_MIN).astype(np.float32)


if __name__ == "__main__":
    import argparse

    from dubber import data
    from dubber.train.offsets import read_table

    parser = argparse.ArgumentParser(description="Write the train split's clips as a portable training pack.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="a built cache (dubber.data.build_cache)")
    parser.add_argument("--offsets", type=Path, default=None, help="measured lags (weights/offsets.csv)")
    parser.add_argument("--crop", action="append", required=True, help="a crop whose transforms go in (repeatable)")
    parser.add_argument("--images", action="append", default=[], help="a crop whose images go in (default: all)")
    parser.add_argument("--grid-every", type=int, default=3)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    table = read_table(args.offsets) if args.offsets else None
    specs = [CropSpec.parse(text) for text in args.crop]
    clips = data.load_clips(data.corpus(args.data, "train", args.grid_every, table), args.cache, specs)
    source = (f"{args.data} train split: GRID s1 every {args.grid_every}th training sentence + manifest_wild.csv "
              f"train clips with speech and a known lag (offsets: {args.offsets or 'the manifest'})")
    write_pack(clips, specs, args.out, [CropSpec.parse(text).key for text in args.images], source)
    print(f"{args.out}: {len(clips)} clips, {sum(len(c['mels']) for c in clips)} frames, "
          f"{len({c['identity'] for c in clips})} identities")
