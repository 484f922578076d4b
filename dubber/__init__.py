"""dubber: make a face (photo or video) speak a speech track, lips in sync.

The Python API (the CLI is a thin layer over it; see README, "Python API"):

    import dubber

    summary = dubber.lipsync("face.jpg", "speech.wav", "out.mp4", overwrite=True)
    faces = dubber.list_faces("interview.mp4")

- `lipsync(face, audio, output, options=None, progress=None, **settings) -> Summary`: options as a
  `LipsyncOptions` or as keywords named like its fields (`backbone`, `device`, `face`, ...);
- `blend_video(source, cache, crops, output, mode="feather", ...) -> Summary`;
- `list_faces(path, detector="hog", every=0.5) -> FaceList` (what `dubber faces` prints);
- `DubberError`: every expected failure, one line; `OptionError`, its subclass for a value an
  option does not allow.

Names are imported on first use, so `import dubber` (and the CLI's start) stays fast.
"""

__version__ = "0.1.0"

_API = {
    "lipsync": "dubber.pipeline",
    "blend_video": "dubber.pipeline",
    "LipsyncOptions": "dubber.pipeline",
    "Summary": "dubber.pipeline",
    "list_faces": "dubber.faces",
    "FaceList": "dubber.faces",
    "DubberError": "dubber.errors",
    "OptionError": "dubber.options",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dubber' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
