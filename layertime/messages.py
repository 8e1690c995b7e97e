"""Short forms of error messages, for reports that give each problem one line."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name when the message is empty."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
