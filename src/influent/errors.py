"""influent's error hierarchy: one base class, a user mistake, a numerical failure, a damaged cache.

- :class:`UserError`: a problem with the user's input (file, column, option value, model name). The CLI
  prints it as one line ``influent: error: ...`` on stderr and exits with status 2, never a traceback.
  Library code names the *field* or argument (``damping``), never a command-line flag; ``field`` carries
  that name so the CLI can say which flag it was.
- :class:`NumericalError`: a computation produced non-finite values or could not be carried out
  (a solve, an eigendecomposition, a training run that diverged).
- :class:`CacheCorruptError`: a cache file failed its checksum or could not be parsed; callers recompute
  (with a one-line warning) where they can, else it reaches the user as one line.
"""

from __future__ import annotations


class InfluentError(Exception):
    """Base class of every error influent raises on purpose."""


class UserError(InfluentError, ValueError):
    """A problem with the user's input, stated in one line.

    Args:
        message: the one-line message.
        field: the option / argument the problem is about (library name, e.g. ``"damping"``), if any.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NumericalError(InfluentError, ArithmeticError):
    """Non-finite values or a failed numerical step (solve, eigendecomposition, divergence)."""


class CacheCorruptError(InfluentError):
    """A cache file is damaged: checksum mismatch, truncated or unparsable."""
