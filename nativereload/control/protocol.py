"""What goes over the control socket: one JSON object per line, each way.

A client connects, writes requests (one JSON object and a newline each) and
reads one reply line per request. Each operation, its wire form and its CLI
form:

    ping    {"op": "ping"}                            (discovery: who serves here)
            -> {"ok": true, "pid": 123, "name": "api", "argv": ["python", "serve.py"]}
    status  {"op": "status"}                          nativereload status, nativereload ps
            -> {"ok": true, "pid": 123, "name": "api", "argv": [...], "modules": [{"name",
                "path", "generation", "images": [{"generation", "state", "in_flight", "pins",
                "handles": {C type: count}, "pointer_results", "held_by"}]}]}
    reload  {"op": "reload", "module": NAME,          nativereload reload NAME
             "allow_interface_change": false,          [--allow-interface-change]
             "canary": false}                          [--canary]
            -> {"ok": true, "pid": 123, "module": NAME, "generation_before": 1,
                "generation": 2, "seconds": 0.0004, "path": "/.../counter.so", "unchanged_since": null,
                "interface_change": null | {"summary": "1 added (compatible)", "text": "...",
                "compatible": true, "added": [...], "removed": [...], "changed": [...]}}
    rollback {"op": "rollback", "module": NAME,       nativereload rollback NAME [--to GENERATION]
             "generation": 3}
            -> the same reply as reload
    unload  {"op": "unload", "module": NAME}          nativereload unload NAME
            -> {"ok": true, "pid": 123, "module": NAME, "generation": 2}
    any failure
            -> {"ok": false, "error": {"type": "SymbolError", "message": "..."}}

Requests are UTF-8 (a request in another encoding is an error). Invalid
JSON, an unknown op, a field of the wrong type or an unknown field
gets an error reply of type ``ProtocolError`` on the same connection. A
request line longer than ``MAX_REQUEST`` bytes gets one and the connection is
closed. Nothing a client sends is ever used as a path or evaluated: ``reload``
re-reads the file the module was loaded from.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ProtocolError

__all__ = ["MAX_REQUEST", "OPS", "check_request", "decode_reply", "decode_request", "encode", "error_reply"]

MAX_REQUEST = 64 * 1024
"""Longest request line accepted, in bytes (without its newline)."""

OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "ping": {},
    "status": {},
    "reload": {"module": (str, True), "allow_interface_change": (bool, False), "canary": (bool, False)},
    "rollback": {"module": (str, True), "generation": (int, False)},
    "unload": {"module": (str, True)},
}
"""Each operation's fields besides ``op``: name -> (JSON type, required)."""


def encode(message: dict) -> bytes:
    """One message as a line on the wire: compact JSON, UTF-8, a newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_reply(kind: str, message: str) -> dict:
    """The reply for a failure: ``{"ok": false, "error": {"type": kind, "message": message}}``."""
    return {"ok": False, "error": {"type": kind, "message": message}}


def decode_request(line: bytes) -> dict:
    """A request line (without its newline) -> the request, checked against ``OPS``.

    Raises:
        ProtocolError: not JSON, not an object, unknown op, unknown field, or
            a ``module`` that is not a non-empty string.
    """
    # UTF-8 only. json.loads(bytes) would also accept UTF-16 and UTF-32 (it
    # guesses the encoding from the first bytes), so decode first, strictly.
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"a request must be UTF-8 text; byte {exc.start} is 0x{line[exc.start]:02x} "
                            "(UTF-16 and UTF-32 are not accepted)") from None
    if "\0" in text:
        # Valid UTF-8, but JSON never holds a raw NUL: this is UTF-16 or UTF-32 text.
        raise ProtocolError("a request must be UTF-8 text; it holds NUL bytes (UTF-16 and UTF-32 are not "
                            "accepted)")
    try:
        req = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("invalid JSON: nested too deeply") from None
    return check_request(req)


def check_request(req: Any) -> dict:
    """A decoded request, checked against ``OPS``; the same errors as ``decode_request``."""
    if not isinstance(req, dict):
        raise ProtocolError("a request must be a JSON object, e.g. {\"op\": \"status\"}")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
    fields = OPS[op]
    extra = set(req) - {"op"} - set(fields)
    if extra:
        raise ProtocolError(f"op {op!r} takes no field(s) {', '.join(sorted(map(str, extra)))}")
    for field, (kind, required) in fields.items():
        if field not in req:
            if required:
                raise ProtocolError(f"op {op!r} needs {field!r}" + (": a module name (string)"
                                                                       if field == "module" else ""))
            continue
        value = req[field]
        if not isinstance(value, kind) or (kind is str and not value) or (kind is not bool and
                                                                           isinstance(value, bool)):
            what = {str: "a non-empty string", bool: "true or false", int: "an integer"}[kind]
            raise ProtocolError(f"op {op!r}: {field!r} must be {what}" + (": a module name (string)"
                                                                          if field == "module" else ""))
    return req


def decode_reply(line: bytes) -> dict | None:
    """A reply line -> the reply, or None if it is not a JSON object with ``ok``."""
    try:
        reply: Any = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(reply, dict) or "ok" not in reply:
        return None
    return reply
