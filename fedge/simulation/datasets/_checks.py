"""Argument checks shared by the datasets modules."""

from __future__ import annotations

import numbers


def require_int(name: str, value: object, minimum: int) -> int:
    """`value` as an int; a ValueError naming it unless it is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
