"""Argument checks shared by the public constructors: one message style everywhere.

A wrong type raises TypeError and a wrong value ValueError, each naming the
argument, what it got (``!r``) and what it takes.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_count", "check_positive_int", "check_seconds"]


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int ``>= 1`` (numpy integers accepted, bools not)."""
    number = _as_int(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return number


def check_count(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum`` (numpy integers accepted, bools not)."""
    number = _as_int(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value!r}")
    return number


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int; got {value!r}")
    return int(value)


def check_seconds(name: str, value: object) -> float:
    """``value`` as a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds; got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds; got {value!r}")
    return float(value)
