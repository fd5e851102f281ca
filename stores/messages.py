"""One-line messages from exceptions, for the errors gsae prints (every message is one line)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``exc``'s message, cut at ``limit`` characters, or the name of its type
    when the message is empty."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
    return (line[:limit] if limit else line) or type(exc).__name__


def first_few(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, comma-separated, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def joined_lines(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` with the message's lines joined into one (transformers' often run over several),
    cut at ``limit`` characters; the type alone where the message is empty."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
