"""The user-input error family: every error about a user's files, folders or settings derives
from ``InputError``, so each command turns any of them into one line (``protoad_jax.cli``).

Anything that is not an ``InputError`` is a bug and keeps its traceback. The specific classes
live beside the code that raises them (``ExportError`` in export, ``CheckpointError`` in
weights, ...); the ones several modules raise are here.
"""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: a file, folder or setting. The message names what is wrong and
    the fix; commands print it as one line and exit with status 1."""


class SettingsError(InputError):
    """A setting or argument out of its range (a ``Config`` field, a batch size, a quantile)."""


class BadImageError(InputError):
    """An image file is missing or cannot be decoded.

    Attributes:
      path: the file.
      reason: what is wrong with it, without the path (e.g. ``"file does not exist"``).
      skippable: True when the error comes from a step that can skip unreadable files instead
        (``pipeline.score_images(..., skip_bad=True)``); False for training images.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, reason: str = ""):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.reason = reason or message
        self.skippable = False



class DatasetError(InputError):
    """A dataset folder does not have the expected layout."""



class NoWeightsError(InputError):
    """No backbone weights are available and a random-init backbone was not allowed; the message
    says how to get the weights (commands add their flags)."""
