"""dubber: make a face (photo or video) speak a speech track, lips in sync."""

__version__ = "0.1.0"
