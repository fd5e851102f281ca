"""One-line messages from exceptions, for the errors gsae prints (every message is one line)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``exc``'s message, cut at ``limit`` characters, or the name of its type
    when the message is empty."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
    return (line[:limit] if limit else line) or type(exc).__name__
