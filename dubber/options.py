"""The one validation layer: every value a user can type is checked here before any work starts.

Each check raises `OptionError`, a one-line `DubberError` that names the option, the value given
and what is allowed (`--fps -5: must be greater than 0`); the CLI exits with code 2 for it, as
for any usage error, and with 1 for input errors (a missing, corrupt or faceless input file).
The checks take plain values, so the CLI, the Python API (`dubber.lipsync`) and batches share
them; command-level functions (`check_lipsync`, `check_blend`, ...) check a whole command line,
combinations included.
"""

import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from dubber.errors import DubberError

PathLike = Union[str, Path]

# Allowed values shared by the CLI, the API and the checks.
BLEND_CHOICES = ("auto", "feather", "poisson", "alpha")
BLEND_VIDEO_MODES = ("feather", "poisson", "alpha")
DETECTORS = ("hog", "cnn")
LOOP_MODES = ("pingpong", "repeat", "hold", "stretch")  # speech longer than the video
CRF_RANGE = (0, 51)  # libx264
FPS_RANGE = (1.0, 240.0)
MAX_BATCH_FRAMES = 4096
MAX_PAD = 512  # pixels
OUTPUT_SUFFIXES = (".mp4",)
KIND_OF_SUFFIX = {".mp4": "an H.264/AAC MP4 video", ".pt": "a dubber model file", ".png": "a PNG image"}
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class OptionError(DubberError):
    """A value an option does not allow: the CLI prints it as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, option: str, value, problem: str):
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option} {show(value)}: {problem}")


def show(value) -> str:
    """A value as the user typed it: paths and words bare (quoted when they hold spaces or are empty)."""
    if isinstance(value, (tuple, list)):
        return " ".join(show(v) for v in value)
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        value = int(value)
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


# ---------------------------------------------------------------------------------------------
# single values


def number(option: str, value, low=None, high=None, above=None, what: str = ""):
    """`value` within [low, high] (either bound optional) and > `above` when given; returns it."""
    suffix = f" ({what})" if what else ""
    bad = (value != value or  # NaN
           (low is not None and value < low) or (high is not None and value > high) or
           (above is not None and value <= above))
    if bad:
        if above is not None and high is not None:
            allowed = f"must be greater than {show(above)} and at most {show(high)}"
        elif above is not None:
            allowed = f"must be greater than {show(above)}"
        elif low is not None and high is not None:
            allowed = f"must be between {show(low)} and {show(high)}"
        elif low is not None:
            allowed = f"must be at least {show(low)}"
        else:
            allowed = f"must be at most {show(high)}"
        raise OptionError(option, value, allowed + suffix)
    return value


def choice(option: str, value: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise OptionError(option, value, f"must be one of {', '.join(allowed)}")
    return value


def existing_file(option: str, path: PathLike) -> Path:
    """An option naming a file to read: it exists, is a file and is readable."""
    path = Path(path)
    if not path.exists():
        raise OptionError(option, path, "file not found")
    if path.is_dir():
        raise OptionError(option, path, "is a folder; name a file")
    if not os.access(path, os.R_OK):
        raise OptionError(option, path, "file is not readable (permission denied)")
    return path


def existing_folder(option: str, path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise OptionError(option, path, "folder not found")
    if not path.is_dir():
        raise OptionError(option, path, "is a file; name a folder")
    return path


def nearest_existing(path: Path) -> Path:
    """`path` or the closest ancestor of it that exists (the current folder at worst)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_creatable(option: str, path: Path, shown: Path) -> None:
    """Everything above `path` that exists is a writable folder (so `path` can be created)."""
    above = nearest_existing(path.parent)
    if not above.is_dir():
        raise OptionError(option, shown, f"{above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OptionError(option, shown, f"folder {above} is not writable")


def output_file(option: str, path: PathLike, inputs: Sequence[PathLike] = (), overwrite: bool = False,
                suffixes: Sequence[str] = OUTPUT_SUFFIXES) -> Path:
    """An option naming a file to write: the right kind, not an input, not a folder, creatable;
    an existing file only with --overwrite."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(option, path, f"is a folder; name the {suffixes[0] + ' ' if suffixes else ''}file to write")
    if suffixes and path.suffix.lower() not in suffixes:
        kind = KIND_OF_SUFFIX.get(suffixes[0], f"a {suffixes[0]} file")
        raise OptionError(option, path, f"must end in {' or '.join(suffixes)} ({kind} is written)")
    for source in inputs:
        if source is not None and Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise OptionError(option, path, "is an input; inputs are never overwritten")
    _check_creatable(option, path, path)
    if path.exists() and not overwrite:
        raise OptionError(option, path, "exists (add --overwrite to replace it)")
    return path


def output_folder(option: str, path: PathLike) -> Path:
    """An option naming a folder to write into: not a file, creatable or writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(option, path, "is a file; name a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OptionError(option, path, "folder is not writable")
    else:
        _check_creatable(option, path, path)
    return path


def device(option: str, name: str) -> str:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where there is one."""
    if not DEVICE_RE.match(name or ""):
        raise OptionError(option, name, "must be auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(option, name, "no CUDA GPU is available here; use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise OptionError(option, name, f"this machine has {count} CUDA GPU{'s' if count > 1 else ''}: "
                                            + ", ".join(f"cuda:{i}" for i in range(count)))
    return name


def resolved_device(name: str) -> str:
    """The device `name` (checked) stands for: auto -> cuda when present, else cpu."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def half(option: str, enabled: bool, device_name: str, notes: Optional[List[str]] = None) -> bool:
    """fp16 runs on CUDA only: with --device cpu it is an error; with auto on a machine without a
    GPU it falls back to fp32 with a note (as whisper does)."""
    if not enabled:
        return False
    if resolved_device(device_name) == "cpu":
        if device_name == "cpu":
            raise OptionError(f"{option} with --device", device_name, "fp16 needs a CUDA device (drop --half)")
        if notes is not None:
            notes.append("--half: no CUDA GPU here, so the model runs in fp32 on the CPU")
        return False
    return True


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix units (Intel AMX): there bf16 convolutions take half
    the time of fp32 ones (DCK, one thread, batch 16: 20.5 -> 10.5 ms of CPU a frame, output within
    0.04 grey levels on average); on CPUs without them bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: assume no
        return False


def precision(option: str, value: str, half_enabled: bool, device_name: str) -> str:
    """auto, fp32 or bf16 -> the one the model runs in: "fp16" (--half), "bf16" or "fp32".
    auto is bf16 on a CPU with bf16 units (cpu_computes_bf16), fp32 everywhere else."""
    choice(option, value, PRECISIONS)
    if half_enabled:
        if value != "auto":
            raise OptionError(option, value, "--half already chooses fp16; give one of the two")
        return "fp16"
    if value == "auto":
        return "bf16" if resolved_device(device_name) == "cpu" and cpu_computes_bf16() else "fp32"
    return value


def face_box(option: str, text: Optional[str]) -> Optional[Tuple[float, float, float, float]]:
    """'x0,y0,x1,y1' in pixels -> a tuple, x1 > x0 and y1 > y0, none negative."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        values = tuple(float(v) for v in text)
    else:
        try:
            values = tuple(float(v) for v in str(text).split(","))
        except ValueError:
            values = ()
    if len(values) != 4 or any(v != v for v in values):
        raise OptionError(option, text, "must be x0,y0,x1,y1 in pixels (four numbers)")
    x0, y0, x1, y1 = values
    if min(values) < 0 or x1 <= x0 or y1 <= y0:
        raise OptionError(option, text, "must be x0,y0,x1,y1 with x1 > x0, y1 > y0 and none negative")
    return values


def pads(option: str, values: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    """Wav2Lip's --pads: top bottom left right, in frame pixels (negative shrinks)."""
    if values is None:
        return (0, 0, 0, 0)
    values = tuple(int(v) for v in values)
    if len(values) != 4:
        raise OptionError(option, values, "must be four numbers: top bottom left right (pixels)")
    for v in values:
        if abs(v) > MAX_PAD:
            raise OptionError(option, values, f"each pad must be between -{MAX_PAD} and {MAX_PAD} pixels")
    return values


def backbone(option: str, name: Optional[str], generators_only: bool = True) -> Optional[str]:
    """A name in the registry (a generator, unless the sync expert is allowed too)."""
    if name is None:
        return None
    from dubber.backbones import PLANNED, available, models

    known = available() if generators_only else models()
    if name in known:
        return name
    listing = ", ".join(sorted(known))
    if name in PLANNED:
        raise OptionError(option, name, f"not implemented yet; available: {listing}")
    if name in models():
        raise OptionError(option, name, f"is not a generator backbone; available: {listing}")
    raise OptionError(option, name, f"unknown backbone; available: {listing}")


def seconds(option: str, value: Optional[float], allow_zero: bool = True) -> Optional[float]:
    if value is None:
        return None
    if allow_zero:
        return number(option, value, low=0.0, what="seconds")
    return number(option, value, above=0.0, what="seconds")


# ---------------------------------------------------------------------------------------------
# inputs (positional arguments): input errors, exit 1


def input_file(path: PathLike) -> Path:
    """A file the command reads: exists, is a file, readable, not empty (DubberError otherwise)."""
    from dubber import media

    return media.check_input(path)
