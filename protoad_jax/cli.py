"""The ``protoad`` command: ``protoad <command> --flags``, and one line for every bad input.

Commands (``protoad_jax/commands/<name>.py``; ``scripts/<name>.py`` runs the same code):
  protoad evaluate           fit, score and measure a dataset; tables, maps and a report
  protoad predict            score new images with a fitted or exported model
  protoad export             write a portable scorer (jax.export artifact + weights + manifest)
  protoad convert-weights    torchvision .pth -> the .npz the backbone loads (no torch needed)
  protoad compare-reference  maps and scores against the PyTorch reference (needs [test])
  protoad update             add normal images to a fitted model without a refit

``protoad <command> --help`` lists a command's flags. Any ``protoad_jax.InputError`` (a missing,
truncated or wrong file, an empty folder, a flag out of range) ends the command with one line
``error: <what is wrong and the fix>`` on stderr and exit status 1; commands write every file
atomically, so nothing is left half-written. Anything else is a bug and keeps its traceback.
Library errors never name a command-line flag; ``error_line`` adds the flag that applies.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from protoad_jax.errors import BadImageError, InputError, NoWeightsError

COMMANDS = {
    "evaluate": "evaluate",
    "predict": "predict",
    "export": "export",
    "convert-weights": "convert_weights",
    "compare-reference": "compare_reference",
    "update": "update",
}
WEIGHTS_HINT = ("Pass --weights=PATH.npz (`protoad convert-weights` makes it), or "
                "--allow_random_weights to run with a random-init backbone (results are then not "
                "meaningful).")


class CommandError(InputError):
    """A command's own input error (flags that do not fit together, a library error with the flag
    that fixes it added to the message)."""

    @classmethod
    def hinted(cls, e: Exception, hint: str) -> CommandError:
        """``CommandError("<e> <hint>")``; raise it ``from e``."""
        return cls(f"{e} {hint}")


def error_line(e: Exception) -> str:
    """``"error: <message>"`` on one line, plus the flag that skips the file when skipping
    applies, or the weights flags when there are no weights."""
    line = "error: " + " ".join(str(e).split())
    if isinstance(e, BadImageError) and e.skippable:
        line += " Or pass --skip_bad_images to skip it (it is then listed as skipped)."
    if isinstance(e, NoWeightsError):
        line += " " + WEIGHTS_HINT
    return line


def enable_compile_cache(folder: str | None) -> None:
    """``compile_cache.enable(folder)`` for a command's ``--compile_cache_dir`` flag (None: not
    given); a folder that cannot be used is a ``CommandError`` naming the flag."""
    from protoad_jax import compile_cache

    try:
        compile_cache.enable(folder)
    except InputError as e:
        raise CommandError.hinted(e, "Or pass --compile_cache_dir=DIR (a writable folder), or "
                                     "--compile_cache_dir= to run without it.") from e


def clean_errors(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """Wraps an absl ``main``: an ``InputError`` prints ``error_line`` on stderr and returns 1."""
    @functools.wraps(main)
    def wrapped(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except InputError as e:
            print(error_line(e), file=sys.stderr)
            return 1

    return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag as one ``error:`` line and exit status 1."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {' '.join(str(e).split())} (see {argv[0]} --help)", file=sys.stderr)
        sys.exit(1)


def run(name: str, argv: Sequence[str] | None = None) -> None:
    """Runs the command ``name`` (a key of ``COMMANDS``) with ``argv`` (default: the process's
    arguments after the program name); exits with its status."""
    from absl import app

    module = importlib.import_module(f"protoad_jax.commands.{COMMANDS[name]}")
    args = sys.argv[1:] if argv is None else list(argv)
    main_module = sys.modules.get("__main__")
    if main_module is not None:  # absl's --help prints the __main__ docstring
        main_module.__doc__ = module.__doc__
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    app.run(clean_errors(module.main), argv=[f"protoad {name}", *args], flags_parser=_parse_flags)


def main() -> None:
    """The ``protoad`` console entry point: ``protoad <command> [--flags]``."""
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help", "help"):
        print("usage: protoad <command> [--flags]   (protoad <command> --help lists its flags)\n")
        print(__doc__.split("\n\n")[1].strip())
        sys.exit(0)
    if not args or args[0] not in COMMANDS:
        what = f"unknown command {args[0]!r}" if args else "no command given"
        print(f"error: {what}; commands: {', '.join(COMMANDS)} (protoad --help)", file=sys.stderr)
        sys.exit(1)
    run(args[0], args[1:])
