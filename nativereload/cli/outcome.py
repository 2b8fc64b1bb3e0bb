"""How a command's outcome reaches the user: exit codes, ``CLIError``, the one JSON document.

The exit codes are defined here: 0 success, 1 the operation failed, 2 usage
error (``main`` alone adds 130, for Ctrl-C). A command raises ``CLIError`` for
an expected failure; ``main`` prints it as ``error: ...`` then ``hint: ...``
(and, with ``--json``, as the ``error_doc`` on stdout) and returns its ``code``.
"""

from __future__ import annotations

import json
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """An expected failure: printed as ``error: message`` (+ ``hint:``); ``kind`` is its JSON ``type``."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_FAILED,
                 kind: str = "Error") -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code
        self.kind = kind


def emit_json(doc: Any) -> None:
    """Print ``doc`` as the command's one JSON document on stdout."""
    print(json.dumps(doc, indent=2))


def error_doc(kind: str, message: str, hint: str | None) -> dict:
    """The JSON document of a failure: ``{"ok": false, "error": {"type", "message", "hint"}}``."""
    return {"ok": False, "error": {"type": kind, "message": message, "hint": hint}}
