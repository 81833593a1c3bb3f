"""What the command-line scripts share: expected input errors as one clean line, not a traceback.

Library errors say what is wrong and how to fix it; only the scripts add their flags (here:
``--skip_bad_images`` and ``WEIGHTS_HINT``, added by ``error_line``; a script raises
``CommandError`` with its flag added to a library error), so the library never names a
command-line option.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from protoad_jax import data, evaluation

WEIGHTS_HINT = ("Pass --weights=PATH.npz (scripts/convert_weights.py makes it), or "
                "--allow_random_weights to run with a random-init backbone (results are then not "
                "meaningful).")


class CommandError(Exception):
    """A library error a script re-raised with the flag that fixes it added to the message."""

    @classmethod
    def hinted(cls, e: Exception, hint: str) -> CommandError:
        """``CommandError("<e> <hint>")``; raise it ``from e``."""
        return cls(f"{e} {hint}")


# Problems with the user's inputs, explained in their message; anything else is a bug: traceback.
EXPECTED_ERRORS = (data.DatasetError, data.BadImageError, evaluation.NoWeightsError, CommandError)


def error_line(e: Exception) -> str:
    """``"error: <message>"``, plus the flag that skips the file when skipping applies, or the
    weights flags when there are no weights."""
    line = f"error: {e}"
    if isinstance(e, data.BadImageError) and e.skippable:
        line += " Or pass --skip_bad_images to skip it (it is then listed as skipped)."
    if isinstance(e, evaluation.NoWeightsError):
        line += " " + WEIGHTS_HINT
    return line


def clean_errors(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """Wraps an absl ``main``: an ``EXPECTED_ERRORS`` prints ``error_line`` on stderr and exits 1.

    Usage: ``sys.exit(app.run(cli.clean_errors(main)))``.
    """
    @functools.wraps(main)
    def wrapped(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except EXPECTED_ERRORS as e:
            print(error_line(e), file=sys.stderr)
            return 1

    return wrapped
