"""The client side of the control socket: send one operation, read its reply.

``request(path, op, **fields)`` is all the command line needs once
``discovery`` has found the socket. The wire format is in ``protocol``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..errors import ControlError
from . import protocol

__all__ = ["request"]


def _connect(sock: socket.socket, path: str | os.PathLike, timeout: float) -> None:
    """connect(), retried while the server's listen backlog is full.

    A Unix socket with a timeout fails at once with EAGAIN when the backlog
    is full (it does not wait like a TCP connect): the server is busy
    accepting, not gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise socket.timeout(f"connect to {path} timed out (listen backlog full)") from None
            time.sleep(0.01)


def request(path: str | os.PathLike, op: str, *, timeout: float = 30.0, **fields: Any) -> dict:
    """Send one operation to the socket at ``path``; return the decoded reply.

    A reply with ``"ok": false`` is returned, not raised: it is the remote
    registry's answer.

    Raises:
        ControlError: the socket cannot be reached, no reply came within
            ``timeout`` seconds, or the reply is not a JSON object.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            _connect(sock, path, timeout)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}", path=path,
                               hint="is the process running and did it call reg.serve()?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nobody is listening on {path} (the process is gone)", path=path) from None
        except PermissionError:
            raise ControlError(f"permission denied connecting to {path}", path=path,
                               hint="the process belongs to another user; run as that user") from None
        sock.sendall(protocol.encode({"op": op, **fields}))
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
    except socket.timeout:
        raise ControlError(f"no reply from {path} within {timeout:g} s", path=path) from None
    except OSError as exc:
        raise ControlError(f"cannot talk to {path}: {exc}", path=path) from None
    finally:
        sock.close()
    line = buffer.split(b"\n", 1)[0]
    reply = protocol.decode_reply(line)
    if reply is None:
        raise ControlError(f"unexpected reply from {path}: {line[:200]!r}", path=path)
    return reply
