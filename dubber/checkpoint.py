"""Self-describing checkpoints: registry name + every constructor argument + state + metadata.

A file fully describes its model (as in demucs): `SelfDescribing` records the arguments each
model was built with (defaults included, so changing a module constant never changes what an old
file means), and `load_model(path, registry)` needs nothing else. Files load with
`torch.load(weights_only=True)`: only tensors and plain Python values are stored.
"""

import datetime
import functools
import hashlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from dubber.errors import DubberError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 stored the class name instead of the registry name


class SelfDescribing(nn.Module):
    """Base of every model a checkpoint holds: subclasses get `init_kwargs` (all constructor
    arguments of the outermost __init__, defaults applied) and `meta` (what trained it).

    Subclasses set `name`, the key of dubber.backbones' registry.
    """

    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _capturing(init)

    def __init__(self):
        super().__init__()
        self.meta: Dict[str, Any] = {}


def _capturing(init: Callable) -> Callable:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "init_kwargs" not in self.__dict__:  # the outermost class records; super() calls do not
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            captured = {}
            for key, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[key].kind
                if kind == inspect.Parameter.VAR_KEYWORD:
                    captured.update(value)
                elif kind != inspect.Parameter.VAR_POSITIONAL:
                    captured[key] = value
            object.__setattr__(self, "init_kwargs", captured)
        init(self, *args, **kwargs)

    return __init__


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes: identifies the weights themselves."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_model(model: SelfDescribing, path: Union[str, Path], meta: Optional[Dict[str, Any]] = None,
               half: bool = False, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write `model` atomically; `half` stores float tensors as fp16. meta gains the state's sha256
    and the date; the file's own sha256 cannot be inside it (weights/README.md lists it)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    meta = dict(meta or {})
    meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    meta["state_sha256"] = state_sha256(state)
    package = {
        "format": FORMAT_VERSION,
        "name": model.name,
        "class": type(model).__name__,
        "kwargs": dict(model.init_kwargs),
        "state": state,
        "meta": meta,
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
    if not isinstance(package, dict) or package.get("format") not in READABLE_FORMATS or "class" not in package:
        raise DubberError("not a dubber checkpoint (missing class/kwargs/state)", path)
    return package


def load_model(path: Union[str, Path], registry: Mapping[str, type]) -> SelfDescribing:
    """Rebuild the model a checkpoint describes, in eval mode on the CPU.

    registry maps names to classes; a format-1 file is found by its class name.
    """
    package = load_package(path)
    by_class = {cls.__name__: cls for cls in registry.values()}
    cls = registry.get(package.get("name", "")) or by_class.get(package["class"])
    if cls is None:
        raise DubberError(f"checkpoint holds unknown model {package.get('name') or package['class']!r}", path)
    model = cls(**package["kwargs"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in package["state"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DubberError(f"checkpoint does not fit model {cls.name!r}: {str(exc).splitlines()[0]}", path) from exc
    model.meta = package.get("meta", {})
    return model.eval()
