"""Validation of the numbers that modes and path states take, with error messages fit for an API."""

from __future__ import annotations

import math
from collections.abc import Mapping


def number(
    name: str, value: object, *, low: float = 0.0, high: float = math.inf, low_open: bool = False
) -> float:
    """`value` as a finite float within [low, high] (or (low, high] when `low_open`), else ValueError."""
    # bool is an int subclass; `true` in a JSON body is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    if not math.isfinite(v) or too_low or v > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be within {bracket}{low:g}, {high:g}], got {value!r}")
    return v


def only(params: Mapping[str, object], allowed: set[str], what: str) -> None:
    """Reject parameters `what` does not take, naming them and the ones it does."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no parameters"
        raise ValueError(f"{what} does not take {', '.join(unknown)} (it takes {takes})")


def integer(name: str, value: object, *, low: int, high: int) -> int:
    """`value` as an int within [low, high], else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer within [{low}, {high}], got {value!r}")
    return value
