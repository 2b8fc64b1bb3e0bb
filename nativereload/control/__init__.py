"""The control socket: a running process's registry, reachable from a shell.

Data flows one way: the CLI -> ``client`` -> the socket -> ``server`` -> the
registry. Each part has its own module:

    protocol.py    what goes over the wire (one JSON object per line, each way)
    server.py      serve(registry) -> Server: the socket, its threads, handle()
    client.py      request(path, op, **fields): one operation, its reply
    discovery.py   where sockets live, and which processes are live (discover())
"""

from ..errors import ControlError, ProtocolError
from .client import request
from .discovery import Target, default_socket_dir, default_socket_path, discover
from .protocol import MAX_REQUEST
from .server import DEFAULT_REQUEST_TIMEOUT, MAX_CONNECTIONS, Server, handle, serve

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "ControlError",
    "ProtocolError",
    "Server",
    "Target",
    "default_socket_dir",
    "default_socket_path",
    "discover",
    "handle",
    "request",
    "serve",
]
