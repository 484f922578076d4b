"""The one registry of models (generators and the sync expert) and their shipped weights.

`load_backbone("dck")` builds the model from `weights/dck.pt` (a self-describing checkpoint).
A backbone without trained weights is an error that says so: the tool never fakes output.
Adding a backbone: one model file here, one recipe in dubber/train/recipes/, one line in BUILTIN.
"""

import importlib
import os
from pathlib import Path
from typing import Dict, Optional, Union

from dubber.backbones.base import (CONDITION_CLOSED_MOUTH, CONDITION_FIRST_FACE, CONDITION_NONE, Backbone,
                                   Generated)
from dubber.errors import DubberError
from dubber.face.crops import CROP_BOX, CROP_FACE, CROP_LIPS, CropSpec

WEIGHTS_DIR = Path(os.environ.get("DUBBER_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))

# Registry name -> the module that defines it (imported on first use, so `dubber --help` stays fast).
BUILTIN = {
    "cran": "dubber.backbones.cran",  # a recurrent unit along the frames; image and video critics
    "dck": "dubber.backbones.dck",
    "glance": "dubber.backbones.glance",
    "lipreader": "dubber.backbones.lipreader",  # GRID's words from mouths: CRAN's lip-reading critic, a word accuracy
    "mia": "dubber.backbones.mia",  # the generator fed back its previous frame; trained with MIA's estimator
    "amie": "dubber.backbones.mia",  # ... the same generator, trained with AMIE's refinements
    "rewrite": "dubber.backbones.rewrite",  # two-stage: audio -> mouth shape -> the video's own mouths
    "syncnet": "dubber.backbones.syncnet",  # the lip-sync expert: eval's judge, a training loss
    "toy_frame": "dubber.backbones.toy",  # reference backbones for the contract, see toy.py
    "toy_clip": "dubber.backbones.toy",
}
# Named by the project but not implemented yet: the error can say so.
PLANNED = ()
DEFAULT_VIDEO_BACKBONE = "rewrite"  # the two-stage backbone: the person's own mouths, moved to the speech (weights/README.md)
DEFAULT_PHOTO_BACKBONE = "dck"

_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a model available under cls.name."""
    _REGISTRY[cls.name] = cls
    return cls


def models() -> Dict[str, type]:
    """Every registered model (generators and experts) by name."""
    for module in sorted(set(BUILTIN.values())):
        importlib.import_module(module)
    return dict(_REGISTRY)


def available() -> Dict[str, type]:
    """The generators (Backbone subclasses) by name."""
    return {name: cls for name, cls in models().items() if issubclass(cls, Backbone)}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def in_weights_dir(path: Union[str, Path]) -> bool:
    """Whether `path` would be written among the shipped files (WEIGHTS_DIR)."""
    return Path(path).resolve().parent == WEIGHTS_DIR.resolve()


def load(name: str, weights: Optional[Union[str, Path]] = None):
    """Build model `name` with its trained weights (or the file `weights`), in eval mode, on CPU."""
    from dubber.checkpoint import load_model

    registry = models()
    if name not in registry:
        if name in PLANNED:
            raise DubberError(f"backbone {name!r} is not implemented yet; available: {', '.join(sorted(available()))}")
        raise DubberError(f"unknown backbone {name!r}; available: {', '.join(sorted(available()))}")
    cls = registry[name]
    if not getattr(cls, "needs_weights", True) and weights is None:
        return cls().eval()
    path = Path(weights) if weights else weights_path(name)
    if not path.is_file():
        raise DubberError(f"no trained weights for {name!r} (train with `dubber train --backbone {name}`)", path)
    model = load_model(path, registry)
    if not isinstance(model, cls) or model.name != name:  # amie's generator is mia's class: the name decides
        raise DubberError(f"weights hold model {model.name!r}, not {name!r}", path)
    return model


def load_backbone(name: str, weights: Optional[Union[str, Path]] = None) -> Backbone:
    """A generator by name (see `load`); the sync expert is not one."""
    if name in models() and name not in available():
        raise DubberError(f"{name!r} is not a generator backbone; available: {', '.join(sorted(available()))}")
    return load(name, weights)


def load_backbone_file(weights: Union[str, Path]) -> Backbone:
    """The generator a weights file holds, whichever it is (a file names its model)."""
    from dubber.checkpoint import load_model

    model = load_model(weights, models())
    if not isinstance(model, Backbone) or model.name not in available():
        raise DubberError(f"holds {model.name!r}, not a generator backbone; available: {', '.join(sorted(available()))}",
                          Path(weights))
    return model


__all__ = ["Backbone", "CropSpec", "Generated", "CROP_BOX", "CROP_FACE", "CROP_LIPS", "CONDITION_CLOSED_MOUTH",
           "CONDITION_FIRST_FACE", "CONDITION_NONE", "register", "models", "available", "load", "load_backbone", "load_backbone_file",
           "weights_path", "in_weights_dir", "WEIGHTS_DIR"]
