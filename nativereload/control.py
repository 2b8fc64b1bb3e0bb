"""The control socket: a running process's registry, reachable from a shell.

Server side: ``serve(registry, socket_path=None) -> Server`` answers on a Unix
domain socket from a daemon thread (``Registry.serve()`` calls it). Client
side: ``discover()`` finds the sockets of this user's live processes and
``request()`` sends one operation. The CLI uses only the client side.

Where the socket lives (found from the environment alone, so the CLI finds it
without being told):
    $XDG_RUNTIME_DIR/nativereload/<pid>.sock                 if XDG_RUNTIME_DIR is set
    ${TMPDIR:-/tmp}/nativereload-sockets-<uid>/<pid>.sock    otherwise
The directory is created 0700 and must be owned by us, else serve() refuses.
The socket is bound inside a fresh 0700 directory, chmod 0600, and only then
renamed into place: it is never reachable with wider permissions, and there is
no moment at which the final path exists without a listener (so a client that
gets ECONNREFUSED knows the socket is stale). Each connection's peer uid
(SO_PEERCRED) must be ours or root's. The socket is removed by Server.close(),
by Registry.close(), and at interpreter exit; sockets of dead pids are removed
by the next serve() in the same directory and by the CLI. A child forked after
serve() (a pre-fork server's worker) inherits no server: it never removes the
parent's socket, and calls serve() itself to get its own.

Protocol: one JSON object per line (UTF-8), one JSON object per line back.

    {"op": "ping"}                    -> {"ok": true, "pid": 123}
    {"op": "status"}                  -> {"ok": true, "pid": 123, "modules": [{"name", "path",
                                          "generation", "images": [{"generation", "state",
                                          "in_flight"}]}]}
    {"op": "reload", "module": NAME}  -> {"ok": true, "pid": 123, "module": NAME,
                                          "generation_before": 1, "generation": 2, "seconds": 0.0004}
    {"op": "unload", "module": NAME}  -> {"ok": true, "pid": 123, "module": NAME, "generation": 2}
    failure                           -> {"ok": false, "error": {"type": "SymbolError", "message": "..."}}

CLI forms: ``nativereload status``, ``nativereload reload NAME``,
``nativereload unload NAME``; ping is what discovery uses.

Only modules already loaded can be reloaded or unloaded, and reload re-reads
the path the module was loaded from: nothing a client sends is ever used as a
path, and nothing is evaluated. Invalid JSON, an unknown op, a wrong type or an
unknown field gets an error reply on the same connection; a request line over
64 KiB gets an error reply and the connection is closed. Each connection is
served by its own thread, so a client that connects and never writes delays
nobody; it is dropped after ``idle_timeout`` seconds.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ControlError, ModuleNotLoaded, NativeReloadError, ProtocolError
from .workdir import pid_alive

__all__ = [
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

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
"""Longest request line accepted, in bytes (without its newline)."""

DEFAULT_IDLE_TIMEOUT = 10.0
"""Seconds a connection may stay silent before it is dropped (read when serve() is called)."""
MAX_CONNECTIONS = 64
"""Connections served at once; at the limit, the one silent the longest is dropped to admit a new one."""
# After refusing an oversized request: how long, and how much, to keep reading
# and discarding what the client is still sending before closing. Closing a
# Unix socket with unread data makes Linux report ECONNRESET to the peer
# (net/unix/af_unix.c, unix_release_sock), and a client still in sendall()
# gets EPIPE: either way it would never read our error reply.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 16 * 1024 * 1024
# Linux's sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107




# --------------------------------------------------------------------------- paths

def default_socket_dir() -> Path:
    """The directory this user's sockets live in, from the environment alone."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "nativereload"
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"nativereload-sockets-{os.getuid()}"


def default_socket_path(pid: int | None = None) -> Path:
    """``default_socket_dir() / "<pid>.sock"`` (this process's pid by default)."""
    return default_socket_dir() / f"{os.getpid() if pid is None else int(pid)}.sock"


def _check_private_dir(path: Path, *, create: bool) -> None:
    """Make sure ``path`` is a real directory, owned by us, mode 0700.

    Created 0700 if missing (and ``create``). An existing one owned by someone
    else, or a symlink, is refused: whoever owns it could swap our socket.
    One of ours with wider permissions is tightened.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create the socket directory {path}: {exc.strerror}", path=path,
                               hint="set XDG_RUNTIME_DIR or TMPDIR to a directory you can write") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ControlError(f"socket directory {path} does not exist", path=path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"socket directory {path} is not a directory (a symlink or a file); refusing it",
                           path=path, hint=f"remove {path}, or set XDG_RUNTIME_DIR to a private directory")
    if st.st_uid != os.geteuid():
        raise ControlError(f"socket directory {path} is owned by uid {st.st_uid}, not by us (uid "
                           f"{os.geteuid()}); refusing to use it", path=path,
                           hint="another user may be trying to intercept the socket: remove the directory "
                                "or set XDG_RUNTIME_DIR to a private directory")
    if create and stat.S_IMODE(st.st_mode) & 0o077:
        logger.warning("socket directory %s had mode %o; setting 0700", path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)


def _check_explicit_parent(parent: Path) -> None:
    """An explicit socket path's parent must be ours and writable by nobody else.

    A missing parent is created 0700. In a directory others can write (even
    /tmp with its sticky bit) someone else could take the name first, or
    expect us to talk to their socket: refused.
    """
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        _check_private_dir(parent, create=True)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{parent} is not a directory", path=parent)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(f"refusing to serve in {parent}: it is owned by uid {st.st_uid} with mode "
                           f"{stat.S_IMODE(st.st_mode):o}, and must be owned by uid {os.geteuid()} and writable "
                           "by nobody else", path=parent,
                           hint="use a private directory for socket_path, or the default (serve() with no path)")


def _listening(path: Path) -> bool:
    """Does anything accept connections on the socket at ``path``?

    ECONNREFUSED on a Unix socket means nobody listens on that inode; our
    sockets only appear at their final path once listening, so it is stale.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Busy, permission denied, timed out: something is there; leave it.
        return True
    finally:
        s.close()
    return True


def _remove_if_stale(path: Path) -> bool:
    """Remove the socket ``path`` if its pid is dead or nobody listens; True if removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(st.st_mode):
        return False
    stem = path.name[: -len(".sock")] if path.name.endswith(".sock") else ""
    dead = stem.isdigit() and not pid_alive(int(stem))
    if dead or not _listening(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        logger.info("removed stale socket %s", path)
        return True
    return False


def _sweep(directory: Path) -> None:
    """Remove the sockets of dead processes in ``directory`` (SIGKILLed servers leave them)."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.endswith(".sock") and entry.name[:-5].isdigit():
            try:
                if not pid_alive(int(entry.name[:-5])):
                    _remove_if_stale(entry)
            except OSError as exc:
                logger.debug("cannot check %s: %s", entry, exc)


# --------------------------------------------------------------------------- server

_live_servers: set["Server"] = set()
_live_lock = threading.Lock()


@atexit.register
def _close_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        server.close()


def _forget_servers_in_child() -> None:
    """After fork(): the child inherits the parent's Server objects but not their threads.

    The socket files belong to the parent (a pre-fork server's master): the
    child must never unlink them at its exit, nor write to the wake-up pipe it
    shares with the parent's accept loop (that would stop the parent serving).
    It only drops its copies of the descriptors; a worker that wants its own
    socket calls serve() again, which binds <its pid>.sock.
    """
    global _live_lock
    # Another thread may have held the lock at fork time; it does not exist here.
    _live_lock = threading.Lock()
    servers = list(_live_servers)
    _live_servers.clear()
    for server in servers:
        server._abandon_in_child()


os.register_at_fork(after_in_child=_forget_servers_in_child)


class Server:
    """A running control socket. Create with ``serve()``.

    Attributes:
        path: the socket's path.

    ``close()`` is idempotent and thread-safe: it stops accepting, removes the
    socket (if it is still ours), and lets open connections finish their
    current request.
    """

    def __init__(self, registry: Any, path: Path, listener: socket.socket, *,
                 idle_timeout: float) -> None:
        self.path = path
        self._owner_pid = os.getpid()
        self._registry = registry
        self._listener = listener
        self._idle_timeout = idle_timeout
        self._inode = os.stat(path).st_ino
        self._closed = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        # Each open connection -> when it last sent a request (time.monotonic()).
        self._connections: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"nativereload-control {path}",
                                        daemon=True)

    def _start(self) -> None:
        with _live_lock:
            _live_servers.add(self)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "serving"
        return f"<nativereload.control.Server {str(self.path)!r} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop serving and remove the socket file.

        In a child forked after serve(), the server is already closed: the
        socket file is the parent's, and it is left alone.
        """
        if os.getpid() != self._owner_pid:
            self._abandon_in_child()
            return
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            connections = list(self._connections)
        with _live_lock:
            _live_servers.discard(self)
        # Remove the path only if it is still our socket: a later server may
        # have replaced it.
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove control socket %s: %s", self.path, exc)
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the accept loop already ended and closed the pipe
            pass
        for conn in connections:
            # Wakes a connection thread blocked in recv(); it then exits.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        logger.info("control socket %s closed", self.path)

    def _abandon_in_child(self) -> None:
        """Close this process's copies of an inherited server's descriptors; touch nothing shared."""
        if os.getpid() == self._owner_pid or self._closed.is_set():
            return
        self._closed.set()
        self._lock = threading.Lock()
        connections, self._connections = list(self._connections), {}
        # close(), never shutdown(): shutdown acts on the socket the parent still uses.
        for sock in (self._listener, *connections):
            try:
                sock.close()
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The accept loop waits on the listener and a wake-up pipe: closing a
    # listening socket from another thread does not wake accept() on Linux.
    # poll(), not select(): select() cannot watch a descriptor numbered 1024
    # or more, which a busy server process easily has.
    def _accept_loop(self) -> None:
        try:
            poller = select.poll()
            poller.register(self._listener, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while not self._closed.is_set():
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready or self._closed.is_set():
                    break
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        logger.warning("control socket %s: cannot accept: %s", self.path, exc)
                        time.sleep(0.1)
                        continue
                    raise
                self._admit(conn)
        except Exception:
            logger.exception("control socket %s: accept loop failed; no longer serving", self.path)
        finally:
            # The wake-up pipe is close()'s to close: it may still write to it.
            self._listener.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        with self._lock:
            if self._closed.is_set():
                conn.close()
                return
            evicted = None
            if len(self._connections) >= MAX_CONNECTIONS:
                # Full: a silent client must not lock others out, so the one
                # silent the longest makes room (its thread then sees EOF).
                evicted = min(self._connections, key=self._connections.__getitem__)
                del self._connections[evicted]
            self._connections[conn] = time.monotonic()
        if evicted is not None:
            logger.debug("control socket %s: %d connections; dropping the longest silent one", self.path,
                         MAX_CONNECTIONS)
            try:
                evicted.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                         name="nativereload-control-conn").start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            if uid is None or (uid != os.geteuid() and uid != 0):
                logger.warning("control socket %s: refused a connection from uid %s", self.path, uid)
                self._refuse(conn, _error_reply("PermissionError", f"uid {uid} may not use this socket; only "
                                                f"uid {os.geteuid()} and root may"))
                return
            conn.settimeout(self._idle_timeout)
            buffer = b""
            while not self._closed.is_set():
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_REQUEST:
                        self._refuse(conn, _TOO_LONG)
                        return
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        logger.debug("control socket %s: dropping an idle connection", self.path)
                        return
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                line, buffer = buffer[:newline], buffer[newline + 1:]
                if len(line) > MAX_REQUEST:
                    self._refuse(conn, _TOO_LONG)
                    return
                if not line.strip():
                    continue
                with self._lock:
                    if conn in self._connections:
                        self._connections[conn] = time.monotonic()
                if not _send(conn, self._handle_line(line)):
                    return
        except OSError as exc:
            logger.debug("control socket %s: connection ended: %s", self.path, exc)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _refuse(self, conn: socket.socket, reply: dict) -> None:
        """Send ``reply`` (an error), then close so that the client reads the reply, not a reset or EPIPE.

        The client may still be sending, or not have sent yet (a peer refused
        the moment it connects): what it sends is read and discarded (for at
        most _LINGER_SECONDS and _LINGER_BYTES) until it stops or hangs up.
        """
        _send(conn, reply)
        try:
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            discarded = 0
            while discarded < _LINGER_BYTES and not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.settimeout(min(left, 0.5))
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    break  # the client stopped sending: it is reading our reply
                if not chunk:
                    break
                discarded += len(chunk)
        except OSError:
            pass

    def _handle_line(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            return _error_reply("ProtocolError", f"invalid JSON: {exc}")
        except RecursionError:
            return _error_reply("ProtocolError", "invalid JSON: nested too deeply")
        try:
            return handle(self._registry, req)
        except NativeReloadError as exc:
            return _error_reply(type(exc).__name__, str(exc))
        except Exception as exc:
            logger.exception("control socket %s: request %r failed", self.path, req)
            return _error_reply(type(exc).__name__, str(exc) or repr(exc))


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _error_reply(kind: str, message: str) -> dict:
    return {"ok": False, "error": {"type": kind, "message": message}}


_TOO_LONG = _error_reply("ProtocolError", f"request longer than {MAX_REQUEST} bytes; closing the connection")


def _send(conn: socket.socket, reply: dict) -> bool:
    try:
        conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        return True
    except OSError:
        return False


_FIELDS = {"ping": set(), "status": set(), "reload": {"module"}, "unload": {"module"}}


def _module_status(registry: Any) -> list[dict]:
    modules = []
    for m in registry.status():
        modules.append({
            "name": m.name,
            "path": None if m.path is None else str(m.path),
            "generation": m.generation,
            "images": [{"generation": i.generation, "state": i.state, "in_flight": i.in_flight}
                       for i in m.images],
        })
    return modules


def handle(registry: Any, req: Any) -> dict:
    """Carry out one decoded request against ``registry``; return the reply.

    Raises:
        ProtocolError: not an object, unknown op, wrong type, unknown field.
        NativeReloadError: whatever the registry raised (the old image still serves).
    """
    if not isinstance(req, dict):
        raise ProtocolError("a request must be a JSON object, e.g. {\"op\": \"status\"}")
    op = req.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise ProtocolError(f"unknown op {op!r}; valid ops: {', '.join(sorted(_FIELDS))}")
    extra = set(req) - {"op"} - _FIELDS[op]
    if extra:
        raise ProtocolError(f"op {op!r} takes no field(s) {', '.join(sorted(map(str, extra)))}")
    pid = os.getpid()
    if op == "ping":
        return {"ok": True, "pid": pid}
    if op == "status":
        return {"ok": True, "pid": pid, "modules": _module_status(registry)}
    name = req.get("module")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"op {op!r} needs \"module\": a module name (string)")
    # Only modules this process already loaded: the registry re-reads the path
    # it resolved at load, so nothing from the socket ever names a file.
    # status() also lists unloaded modules still draining: only an active image counts.
    loaded = {m.name: m for m in registry.status() if any(i.state == "active" for i in m.images)}
    if name not in loaded:
        raise ModuleNotLoaded(f"module {name!r} is not loaded in process {pid} (loaded: "
                              f"{', '.join(sorted(loaded)) or 'none'})", module=name)
    before = loaded[name].generation
    if op == "unload":
        registry.unload(name)
        return {"ok": True, "pid": pid, "module": name, "generation": before}
    started = time.perf_counter()
    module = registry.reload(name)
    seconds = time.perf_counter() - started
    return {"ok": True, "pid": pid, "module": name, "generation_before": before,
            "generation": module.generation, "seconds": seconds}


def _bind_private(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the moment it is reachable there.

    Bound inside a fresh 0700 directory next to ``path`` (nobody else can
    reach it there), chmod 0600, listening, then renamed over ``path``.
    rename() replaces a stale socket atomically; it does not touch umask,
    which is process-wide and not thread-safe.
    """
    staging = Path(tempfile.mkdtemp(prefix=".nr-", dir=path.parent))
    temp = staging / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temp))
        os.chmod(temp, 0o600)
        sock.listen(socket.SOMAXCONN)
        os.rename(temp, path)
    except BaseException:
        sock.close()
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    finally:
        os.rmdir(staging)
    return sock


def serve(registry: Any, socket_path: str | os.PathLike | None = None, *,
          idle_timeout: float | None = None) -> Server:
    """Serve ``registry`` on a Unix socket from a daemon thread; return the Server.

    Args:
        socket_path: default ``default_socket_path()``. Its directory is checked
            (see the module docstring); an existing socket there is replaced
            only if stale (dead pid, or nobody listening).
        idle_timeout: seconds a connection may stay silent before it is dropped
            (default ``DEFAULT_IDLE_TIMEOUT``).

    Raises:
        ControlError: unsafe or unusable directory, path too long, or a live
            server already answers at ``socket_path``.
    """
    if socket_path is None:
        directory = default_socket_dir()
        _check_private_dir(directory, create=True)
        path = directory / f"{os.getpid()}.sock"
        _sweep(directory)
    else:
        path = Path(socket_path).absolute()
        _check_explicit_parent(path.parent)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH - 8:  # room for the staging name
        raise ControlError(f"socket path {path} is too long for a Unix socket (at most ~{_MAX_SOCKET_PATH - 8} "
                           "bytes)", path=path, hint="pass a shorter socket_path, or set XDG_RUNTIME_DIR")
    if os.path.lexists(path) and not _remove_if_stale(path):
        raise ControlError(f"{path} is in use (a live server answers there, or it is not a socket)", path=path,
                           hint="close the other server first, or pass another socket_path")
    listener = _bind_private(path)
    server = Server(registry, path, listener,
                    idle_timeout=DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout)
    server._start()
    registry._add_closer(server.close)     # registry.close() stops it first
    logger.info("control socket serving at %s", path)
    return server


# --------------------------------------------------------------------------- client

@dataclasses.dataclass(frozen=True)
class Target:
    """A process reachable through its control socket."""

    pid: int | None
    path: Path


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
    registry's answer. Raises ControlError when the socket cannot be reached
    or the reply is not a JSON object.
    """
    req = {"op": op, **fields}
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
        sock.sendall(json.dumps(req).encode() + b"\n")
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
    except socket.timeout:
        raise ControlError(f"no reply from {path} within {timeout:g} s", path=path) from None
    except OSError as exc:
        if isinstance(exc, ControlError):
            raise
        raise ControlError(f"cannot talk to {path}: {exc}", path=path) from None
    finally:
        sock.close()
    line = buffer.split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"unexpected reply from {path}: {line[:200]!r}", path=path)
    return reply


def discover(*, cleanup: bool = True) -> list[Target]:
    """The sockets of this user's live processes in ``default_socket_dir()``, by pid.

    Sockets of dead processes are removed on the way (``cleanup``). An absent
    directory means no process serves. A directory owned by someone else is
    refused (ControlError) rather than trusted.
    """
    directory = default_socket_dir()
    if not os.path.lexists(directory):
        return []
    _check_private_dir(directory, create=False)
    found = []
    for entry in sorted(directory.iterdir()):
        stem = entry.name[:-5] if entry.name.endswith(".sock") else ""
        if not stem.isdigit():
            continue
        try:
            is_sock = stat.S_ISSOCK(os.lstat(entry).st_mode)
        except FileNotFoundError:
            continue
        if not is_sock:
            continue
        if cleanup and _remove_if_stale(entry):
            continue
        found.append(Target(int(stem), entry))
    found.sort(key=lambda t: t.pid or 0)
    return found
