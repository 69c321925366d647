"""Argument checks the training tools share: an error names the argument, the value given and what is allowed."""

from __future__ import annotations

from typing import Any

__all__ = ["check_bools", "check_count", "is_count"]


def is_count(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would pass ``isinstance(value, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """ValueError unless ``value`` is an int >= 1 (or None with ``optional``)."""
    if optional and value is None:
        return
    if not is_count(value) or value < 1:
        allowed = "None or an int >= 1" if optional else "an int >= 1"
        raise ValueError(f"Invalid value for `{name}`: {value!r}. Allowed: {allowed}.")


def check_bools(**values: Any) -> None:
    """TypeError naming the first keyword whose value is not ``True`` or ``False``."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"Invalid value for `{name}`: {value!r}. Allowed: True or False.")
