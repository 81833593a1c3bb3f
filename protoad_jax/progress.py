"""A dependency-free progress bar on stderr (one line, redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress("features", total=n) as bar: bar.update(k)``; silent when ``enabled`` is False."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", enabled: bool = True):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.n, self.start, self._last, self._done = 0, time.perf_counter(), 0.0, False
        self._tty = sys.stderr.isatty()

    def __enter__(self) -> Progress:  # noqa: PYI034 - no typing.Self on Python 3.10
        self._draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self._done = True
        self._draw(force=True)
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def update(self, k: int = 1) -> None:
        self.n += k
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < (0.2 if self._tty else 10.0)):
            return
        self._last = now
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            text = f"{self.desc}: [{bar}] {self.n}/{self.total} {self.unit} {rate:.1f}/s eta {eta:.0f}s"
        elif self.n == 0:  # a phase without counts: say it runs, then how long it took
            text = f"{self.desc}: {'done in' if self._done else 'running'} {elapsed:.1f} s"
        else:
            text = f"{self.desc}: {self.n} {self.unit} {rate:.1f}/s"
        sys.stderr.write(("\r" if self._tty else "") + text + ("" if self._tty else "\n"))
        sys.stderr.flush()
