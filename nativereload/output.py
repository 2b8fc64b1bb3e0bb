"""Writing to the terminal: the few helpers the CLI, the demo and the watcher share.

Imports nothing from the package, so any of them can use it without
importing another (the CLI imports the demo and the watcher, never the
reverse).
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["arrow", "dash", "print_error", "say"]


def _encodable(stream: Any, text: str, fallback: str) -> str:
    """``text`` where ``stream`` can encode it, else ``fallback`` (PYTHONIOENCODING=ascii must not crash a report)."""
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return fallback
    return text


def arrow(stream: Any) -> str:
    """"\u2192" where ``stream`` can encode it, else "->"."""
    return _encodable(stream, "\u2192", "->")


def dash(stream: Any) -> str:
    """"\u2014" where ``stream`` can encode it, else "-"."""
    return _encodable(stream, "\u2014", "-")


def say(stream: IO[str], text: str) -> None:
    """Print one line to ``stream`` and flush it (live reports must show as they happen)."""
    print(text, file=stream, flush=True)


def print_error(message: str, hint: str | None = None, stream: IO[str] | None = None) -> None:
    """``error: message`` and, if given, ``hint: hint``, on stderr (or ``stream``)."""
    stream = stream if stream is not None else sys.stderr
    print(f"error: {message}", file=stream, flush=True)
    if hint:
        print(f"hint: {hint}", file=stream, flush=True)
