"""Progress display for long work (embedding, fine-tuning, fits, scoring passes, retraining loops).

Every long loop in influent asks :func:`progress_bar` (or :func:`progress_iter`) for its bar, so how progress
looks is decided here and nowhere else:

- stderr is a terminal: a tqdm bar, redrawn in place.
- stderr is not a terminal (CI, ``| tee``, a notebook's captured log): no bar; at most one line per tenth of
  the work (``influent: embedding 30% (180/600 text)``) plus the last one, so a log holds at most 11 lines
  per loop instead of one update per redraw.
- :func:`set_quiet` (the CLI's ``--quiet``) or ``enabled=False``: nothing at all.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Self, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool = True) -> None:
    """Silence every progress display of this process (``--quiet``)."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    """Whether :func:`set_quiet` switched progress off."""
    return _QUIET


class LogProgress:
    """A tqdm look-alike that writes one line per tenth of the work to a stream that is not a terminal.

    Supports what influent's loops use: ``update``, ``set_postfix``, ``close`` and the context manager.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", stream=None):
        self.total, self.desc, self.unit, self.n = int(total or 0), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.postfix = ""
        self._last_tenth = self._tenth()
        self._closed = False

    def _tenth(self) -> int:
        return 10 * self.n // self.total if self.total > 0 else 0

    def _write(self) -> None:
        share = f"{100 * self.n // self.total}% " if self.total > 0 else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"influent: {self.desc} {share}({self.n}/{self.total} {self.unit}){extra}", file=self.stream,
              flush=True)

    def update(self, n: int = 1) -> None:
        """``n`` more steps done; a line when a new tenth of the total is reached."""
        self.n += int(n)
        tenth = self._tenth()
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            self._write()

    def set_postfix(self, **values) -> None:
        """Values shown after the count on the next line written (``loss=0.41``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Done; nothing more is written."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A progress display over ``total`` steps (``enabled=False`` or quiet: a silent one, same interface).

    Args:
        total: number of steps.
        desc: what is being done, shown before the bar.
        enabled: show it at all.
        initial: steps already done (a resumed run).
        unit: what one step is.

    Returns:
        A tqdm bar on a terminal, else a :class:`LogProgress`; both take ``update``/``set_postfix``/``close``.
    """
    if not enabled or _QUIET:
        return tqdm(total=total, desc=desc, disable=True, initial=initial, unit=unit)
    if _is_terminal(sys.stderr):
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=False)
    return LogProgress(total, desc, initial=initial, unit=unit)


def progress_iter(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None,
                  unit: str = "it") -> Iterator[T]:
    """``items``, one at a time, with a :func:`progress_bar` over them (``total`` defaults to ``len(items)``;
    an iterable without a length gets a count without a share)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = progress_bar(total, desc, enabled=enabled, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
