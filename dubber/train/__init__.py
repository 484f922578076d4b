"""Training: corpus -> preprocess cache -> clips -> one loop (dubber.train.loop) with the model's
recipe (dubber.train.recipes) -> a self-describing model file.

`train_from_corpus` is the plain-Python form of `dubber train --backbone NAME`.
"""

from pathlib import Path
from typing import Callable, Dict, Optional

from dubber.errors import DubberError


def train_from_corpus(name: str, data_root: Path, cache_dir: Path, out_path: Path, steps: int,
                      batch_size: Optional[int] = None, device: str = "auto", grid_every: int = 3,
                      resume: bool = True, sync_expert: Optional[Path] = None, val_every: int = 0,
                      patience: int = 0, log_every: int = 50, checkpoint_every: int = 500, workers: int = 2,
                      hyperparameters: Optional[Dict[str, object]] = None, seed: int = 0,
                      offsets: Optional[Path] = None, log: Callable[[str], None] = print, progress=None,
                      max_seconds: Optional[float] = None, pack: Optional[Path] = None) -> Path:
    """Train registered model `name` on the train split of `data_root`; returns the written file.

    grid_every: use every n-th GRID training sentence (GRID is one speaker and identity sampling
    draws it rarely). offsets: a table of measured audio-visual lags (dubber.train.offsets).
    Validation (val_every > 0) uses recipe.validation_clips clips of recipe.validation_split: the
    selection half of the val identities ("val_select"; the test half is never looked at here),
    or GRID's held-out sentences for a lip reader ("grid_val"). max_seconds: a training-time budget
    (dubber.train.loop.train). pack: train on a pack (dubber.train.pack, written from this corpus,
    e.g. to carry to a GPU machine) instead of data_root and the cache; a pack holds only the
    mouth's landmarks, so there is no validation. Under torchrun (dubber.train.distributed) process 0
    builds the cache while the others wait, and reports alone.
    """
    from dubber import data
    from dubber.train import distributed
    from dubber.train.loop import train
    from dubber.train.recipes import recipe_for

    data_root = Path(data_root)
    log, progress = distributed.main_only(log, progress)
    if pack is not None:
        return _train_from_pack(name, Path(pack), out_path, steps, device, resume, log_every, checkpoint_every,
                                _overrides(batch_size, sync_expert, hyperparameters), seed, log, progress, max_seconds)
    if not data_root.is_dir():
        raise DubberError("training data folder not found", data_root)
    recipe = recipe_for(name, **_overrides(batch_size, sync_expert, hyperparameters))
    device = distributed.join(_torch_device(device))

    table = None
    if offsets is not None:
        from dubber.train.offsets import read_table

        table = read_table(offsets)
    items = data.corpus(data_root, "train", grid_every, table)
    val_items = _spread(data.corpus(data_root, recipe.validation_split, offsets=table),
                        recipe.validation_clips) if val_every else []
    specs = list(recipe.crops())
    log(f"{len(items)} training files, {len({i['identity'] for i in items})} identities; caching to {cache_dir}")
    distributed.run_on_main(lambda: data.build_cache(items + val_items, cache_dir, specs, workers=workers,
                                                     progress=progress, log=log))
    clips = data.load_clips(items, cache_dir, specs, recipe.mel_width(), pixels=recipe.needs_pixels)
    val_clips = data.load_clips(val_items, cache_dir, specs, recipe.mel_width(),
                                pixels=recipe.needs_pixels) if val_items else []
    log(f"{len(clips)} clips, {sum(len(c['mels']) for c in clips)} frames; {len(val_clips)} validation clips")
    meta = {"source": f"{data_root} train split: GRID s1 every {grid_every}th training sentence + "
                      "manifest_wild.csv train clips with speech and a known lag",
            "offsets": str(offsets) if offsets else "manifest sync_lag_est where sync_peak_est >= 0.2",
            "offsets_table": table or {},  # file -> lag (None: unknown, not trained on)
            "validation_clips": [c["name"] for c in val_clips]}
    train(recipe, clips, out_path, steps, val_clips=val_clips, device=device, seed=seed, resume=resume,
          log_every=log_every, checkpoint_every=checkpoint_every, val_every=val_every, patience=patience,
          data_meta=meta, log=log, progress=progress, max_seconds=max_seconds)
    return Path(out_path)


def _torch_device(name: str):
    import torch

    from dubber.options import resolved_device

    return torch.device(resolved_device(name))


def _overrides(batch_size: Optional[int], sync_expert: Optional[Path], hyperparameters) -> Dict[str, object]:
    """The recipe hyperparameters the caller sets (the shorthands folded into --set's)."""
    overrides = dict(hyperparameters or {})
    if batch_size:
        overrides["batch_size"] = batch_size
    if sync_expert is not None:
        overrides["sync_expert"] = str(sync_expert)
    return overrides


def _train_from_pack(name, pack: Path, out_path, steps, device, resume, log_every, checkpoint_every, overrides,
                     seed, log, progress, max_seconds) -> Path:
    from dubber.train.loop import train
    from dubber.train.pack import PACK_CRF, pack_source, read_pack
    from dubber.train.recipes import recipe_for

    if not (pack / "clips.npz").is_file():
        raise DubberError("not a training pack (no clips.npz; python -m dubber.train.pack writes one)", pack)
    recipe = recipe_for(name, **overrides)
    clips = read_pack(pack)
    log(f"{len(clips)} clips, {sum(len(c['mels']) for c in clips)} frames, "
        f"{len({c['identity'] for c in clips})} identities from the pack {pack}")
    meta = {"source": pack_source(pack), "pack": f"{pack.name} (dubber.train.pack: crops as H.264 4:4:4 "
                                                 f"CRF {PACK_CRF}, mels as uint8)"}
    train(recipe, clips, out_path, steps, device=_torch_device(device), seed=seed, resume=resume, log_every=log_every,
          checkpoint_every=checkpoint_every, data_meta=meta, log=log, progress=progress, max_seconds=max_seconds)
    return Path(out_path)


def _spread(items, count: int):
    """At most `count` items, one identity after another (round robin), so validation covers people."""
    by_identity: Dict[str, list] = {}
    for item in items:
        by_identity.setdefault(item["identity"], []).append(item)
    chosen, groups = [], list(by_identity.values())
    while groups and len(chosen) < count:
        for group in list(groups):
            if len(chosen) < count:
                chosen.append(group.pop(0))
            if not group:
                groups.remove(group)
    return chosen
