"""Argument checks of the public API: one wording, and the caller's own name and value.

Each check names the argument as the caller passed it (``n_draft``, not a value derived
from it further down) and says what was expected and what came.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

from .errors import InvalidArgumentError


def _range(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _fail(name: str, kind: str, value: Any, low: Optional[float], high: Optional[float],
          low_open: bool = False, high_open: bool = False, none: bool = False) -> InvalidArgumentError:
    expected = f"{'None or ' if none else ''}{kind}{_range(low, high, low_open, high_open)}"
    return InvalidArgumentError(f"{name} must be {expected}, got {value!r}")


def int_arg(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *,
            none: bool = False) -> Optional[int]:
    """``value`` as an int within [low, high]; None passes when ``none``."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (low is not None and value < low) or (high is not None and value > high):
        raise _fail(name, "an int", value, low, high, none=none)
    return int(value)


def number_arg(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, high_open: bool = False, none: bool = False) -> Optional[float]:
    """``value`` as a float within the range (ends open where asked); NaN never passes."""
    if value is None and none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise _fail(name, "a number", value, low, high, low_open, high_open, none)
    return float(value)
