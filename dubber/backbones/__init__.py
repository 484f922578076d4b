"""The one registry of backbones and their pretrained weights.

`load_backbone("dck")` builds the model from `weights/dck.pt` (a self-describing checkpoint).
A backbone without trained weights is an error that says so: the tool never fakes output.
"""

import os
from pathlib import Path
from typing import Dict, Optional, Union

from dubber.backbones.base import CROP_BOX, CROP_FACE, CROP_LIPS, Backbone, CropSpec, Generated
from dubber.errors import DubberError

WEIGHTS_DIR = Path(os.environ.get("DUBBER_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))

# Backbones named by the project; those not yet implemented are listed so the error can say so.
PLANNED = ("dck", "mia", "amie", "cran", "glance")
DEFAULT_VIDEO_BACKBONE = "dck"
DEFAULT_PHOTO_BACKBONE = "dck"

_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a Backbone subclass available under cls.name."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> Dict[str, type]:
    _import_builtin()
    return dict(_REGISTRY)


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def load_backbone(name: str, weights: Optional[Union[str, Path]] = None) -> Backbone:
    """Build backbone `name` with its trained weights (or the file `weights`), in eval mode, on CPU."""
    from dubber.checkpoint import load_model

    registry = available()
    if name not in registry:
        if name in PLANNED:
            raise DubberError(f"backbone {name!r} is not implemented yet; available: {', '.join(sorted(registry))}")
        raise DubberError(f"unknown backbone {name!r}; available: {', '.join(sorted(registry))}")
    cls = registry[name]
    if not cls.needs_weights:
        return cls().eval()
    path = Path(weights) if weights else weights_path(name)
    if not path.is_file():
        raise DubberError(f"no trained weights for backbone {name!r} (train with `dubber train --backbone {name}`)", path)
    return load_model(path, {c.__name__: c for c in registry.values()})


def _import_builtin() -> None:
    # Imported lazily so `dubber --help` stays fast; each module registers itself.
    import importlib

    for module in ("dck",):
        try:
            importlib.import_module(f"dubber.backbones.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dubber.backbones.{module}":
                raise


__all__ = ["Backbone", "CropSpec", "Generated", "CROP_BOX", "CROP_FACE", "CROP_LIPS",
           "register", "available", "load_backbone", "weights_path", "WEIGHTS_DIR"]
