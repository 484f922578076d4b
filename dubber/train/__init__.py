"""Training: corpus -> preprocess cache -> clips -> a model file in weights/.

`train_from_corpus` is the plain-Python form of `dubber train`; the loops themselves live in
dck.py (the DCK backbone) and syncnet.py (the lip-sync expert used by eval and as a loss).
"""

from pathlib import Path
from typing import Callable, Optional

from dubber.errors import DubberError

TRAINABLE = ("dck", "syncnet")


def hardware_description(device) -> str:
    """What trained a model, for its checkpoint's meta: GPU name, or CPU model + torch threads."""
    import platform

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{name}, {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def train_from_corpus(model: str, data_root: Path, cache_dir: Path, out_path: Path, steps: int,
                      batch_size: Optional[int] = None, device: str = "auto", grid_every: int = 3,
                      resume: bool = True, sync_expert: Optional[Path] = None,
                      log: Callable[[str], None] = print) -> Path:
    """Train `model` ("dck" or "syncnet") on the train split of `data_root`; returns the written file.

    grid_every: use every n-th GRID training sentence (GRID is one speaker and identity sampling
    draws it rarely; caching all 900 only costs time).
    """
    from dubber.pipeline import select_device
    from dubber.train import data

    if model not in TRAINABLE:
        raise DubberError(f"cannot train {model!r}; trainable: {', '.join(TRAINABLE)}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DubberError("training data folder not found", data_root)
    items = data.corpus(data_root, "train", grid_every)
    log(f"{len(items)} training files, {len({i['identity'] for i in items})} identities; caching to {cache_dir}")
    data.build_cache(items, cache_dir, log)
    device_name = str(select_device(device))
    meta = {"data": f"{data_root} train split: GRID s1 every {grid_every}th of the first 900 sentences + "
                    "manifest_wild.csv train clips with speech and a trusted lag estimate"}
    if model == "syncnet":
        from dubber.train.syncnet import train_syncnet

        clips = data.load_clips(items, cache_dir, with_faces=False)
        log(f"{len(clips)} clips, {sum(len(c['mels']) for c in clips)} frames")
        train_syncnet(clips, out_path, steps, batch_size or 64, device=device_name, resume=resume,
                      data_meta=meta, log=log)
        return Path(out_path)
    from dubber.train.dck import train_dck

    clips = data.load_clips(items, cache_dir, crop="box128", with_mouths=False)
    log(f"{len(clips)} clips, {sum(len(c['faces']) for c in clips)} frames")
    expert = None
    if sync_expert is not None:
        from dubber.eval.run import load_sync_expert

        expert = load_sync_expert(sync_expert)
    train_dck(clips, out_path, steps, batch_size or 16, device=device_name, resume=resume, log=log,
              sync_expert=expert, data_meta=meta)
    return Path(out_path)
