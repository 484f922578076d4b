"""The one error type users see: a single line naming the file and the problem."""

from pathlib import Path
from typing import Optional, Union


class DubberError(Exception):
    """An expected failure (bad input, missing model). The CLI prints it as one line, no traceback."""

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
