"""Self-describing checkpoints: class name + constructor arguments + state + metadata.

A file fully describes its model (as in demucs), so `load_model(path)` needs nothing else, and it
loads with `torch.load(weights_only=True)`: only tensors and plain Python values are stored.
"""

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from dubber.errors import DubberError

FORMAT_VERSION = 1


def save_model(model: torch.nn.Module, path: Union[str, Path], meta: Optional[Dict[str, Any]] = None,
               half: bool = False, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write model (which must carry `init_kwargs`) atomically; `half` stores float tensors as fp16."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    package = {
        "format": FORMAT_VERSION,
        "class": type(model).__name__,
        "kwargs": dict(model.init_kwargs),
        "state": state,
        "meta": dict(meta or {}),
    }
    if extra:
        package.update(extra)
    save_atomic(package, path)


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_package(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a checkpoint file safely (weights_only) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise DubberError("model weights not found", path)
    try:
        package = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise DubberError(f"not a readable dubber checkpoint ({type(exc).__name__})", path) from exc
    if not isinstance(package, dict) or package.get("format") != FORMAT_VERSION or "class" not in package:
        raise DubberError("not a dubber checkpoint (missing class/kwargs/state)", path)
    return package


def load_model(path: Union[str, Path], classes: Dict[str, type]) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes; `classes` maps class names to constructors."""
    package = load_package(path)
    cls = classes.get(package["class"])
    if cls is None:
        raise DubberError(f"checkpoint holds unknown model class {package['class']!r}", path)
    model = cls(**package["kwargs"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in package["state"].items()}
    model.load_state_dict(state)
    model.meta = package.get("meta", {})
    return model.eval()
