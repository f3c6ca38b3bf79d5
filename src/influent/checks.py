"""Checks of option values shared by the option dataclasses: finiteness, ranges, counts, named choices.

Each check raises :class:`~influent.errors.UserError` whose message starts with the field's name and whose
``field`` is that name (``damping``), so the CLI can say which flag it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

from influent.errors import UserError


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(
    field: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """``value`` is a finite number (an integer when ``integer``) within the bounds (closed unless ``*_open``)."""
    kind = "an integer" if integer else "a finite number"
    what = f"{field} must be {kind} {_bounds(low, high, low_open, high_open)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        raise UserError(f"{what}, got {value!r}", field=field)
    if not math.isfinite(float(value)):
        raise UserError(f"{what}, got {value!r}", field=field)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise UserError(f"{what}, got {value!r}", field=field)


def check_numbers(field: str, values: Sequence | None, **bounds) -> None:
    """``values`` is a non-empty list, each element passing :func:`check_number` with ``bounds``."""
    if values is None:
        return
    if len(values) == 0:
        raise UserError(f"{field} needs one or more values, got none", field=field)
    for value in values:
        try:
            check_number(field, value, **bounds)
        except UserError as err:
            raise UserError(f"{err} (in {list(values)})", field=field) from None


def check_choice(field: str, value, choices: Iterable) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{field} must be one of {', '.join(map(str, choices))}, got {value!r}", field=field)


def check_text(field: str, value: str | None) -> None:
    """``value`` is None or holds something other than whitespace."""
    if value is not None and not value.strip():
        raise UserError(f"{field} is empty", field=field)
