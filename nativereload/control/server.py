"""The server side of the control socket: a running process's registry, reachable from a shell.

``serve(registry, socket_path=None) -> Server`` answers on a Unix domain
socket from a daemon thread (``Registry.serve()`` calls it). Requests are
decoded by ``protocol`` and carried out by ``handle()`` against the registry.

The socket is bound inside a fresh 0700 directory, chmod 0600, and only then
renamed into place: it is never reachable with wider permissions, and there is
no moment at which the final path exists without a listener (so a client that
gets ECONNREFUSED knows the socket is stale). Each connection's peer uid
(SO_PEERCRED) must be ours or root's. The socket is removed by Server.close(),
by Registry.close(), and at interpreter exit. A child forked after serve() (a
pre-fork server's worker) inherits no server: it never removes the parent's
socket, and calls serve() itself to get its own.

Each connection is served by its own thread, so a client that connects and
never writes delays nobody. Each request must arrive complete within
``request_timeout`` seconds of the connection being ready for it (accepted, or
its previous reply sent): a silent connection is dropped, and a slow or
trickling request gets an error reply before the connection is closed.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import select
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from ..errors import ControlError, ModuleNotLoaded, NativeReloadError
from . import protocol
from .discovery import check_private_dir, remove_if_stale, serving_dir, sweep
from .protocol import MAX_REQUEST

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "MAX_CONNECTIONS", "Server", "check_name", "handle", "program_name",
           "serve"]

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to deliver each complete request line (read when serve() is called)."""
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




def _check_explicit_parent(parent: Path) -> None:
    """An explicit socket path's parent must be ours and writable by nobody else.

    A missing parent is created 0700. In a directory others can write (even
    /tmp with its sticky bit) someone else could take the name first, or
    expect us to talk to their socket: refused.
    """
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        check_private_dir(parent, create=True)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{parent} is not a directory", path=parent)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(f"refusing to serve in {parent}: it is owned by uid {st.st_uid} with mode "
                           f"{stat.S_IMODE(st.st_mode):o}, and must be owned by uid {os.geteuid()} and writable "
                           "by nobody else", path=parent,
                           hint="use a private directory for socket_path, or the default (serve() with no path)")


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
    global _live_lock, _op_locks_guard
    # Another thread may have held these locks at fork time; it does not exist here.
    _live_lock = threading.Lock()
    _op_locks_guard = threading.Lock()
    _op_locks.clear()
    servers = list(_live_servers)
    _live_servers.clear()
    for server in servers:
        server._abandon_in_child()


os.register_at_fork(after_in_child=_forget_servers_in_child)


class Server:
    """A running control socket. Create with ``serve()``.

    Attributes:
        path: the socket's path.
        name: the name the command line can address this process by (``--name``).

    ``close()`` is idempotent and thread-safe: it stops accepting, removes the
    socket (if it is still ours), and lets open connections finish their
    current request.
    """

    def __init__(self, registry: Any, path: Path, listener: socket.socket, *, name: str,
                 request_timeout: float) -> None:
        self.path = path
        self.name = name
        self._owner_pid = os.getpid()
        self._registry = registry
        self._listener = listener
        self._request_timeout = request_timeout
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
        return f"<nativereload.control.Server {self.name!r} at {str(self.path)!r} {state}>"

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
                self._refuse(conn, protocol.error_reply("PermissionError", f"uid {uid} may not use this socket; only "
                                                f"uid {os.geteuid()} and root may"))
                return
            buffer = b""
            # Each request must be complete within request_timeout of the
            # moment the connection was ready for it (accepted, or its previous
            # reply sent): a per-recv() timeout alone would let a client that
            # sends one byte every few seconds hold a thread for ever.
            deadline = time.monotonic() + self._request_timeout
            while not self._closed.is_set():
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_REQUEST:
                        self._refuse(conn, _TOO_LONG)
                        return
                    left = deadline - time.monotonic()
                    if left > 0:
                        conn.settimeout(left)
                        try:
                            chunk = conn.recv(65536)
                        except socket.timeout:
                            chunk = None
                    else:
                        chunk = None
                    if chunk is None:
                        if buffer.strip():
                            logger.debug("control socket %s: a request took over %g s; dropping it", self.path,
                                         self._request_timeout)
                            self._refuse(conn, protocol.error_reply(
                                "ProtocolError", f"request not complete within {self._request_timeout:g} s; "
                                "closing the connection"))
                        else:
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
                reply = self._handle_line(conn, line)
                if reply is None or not _send(conn, reply):
                    return
                deadline = time.monotonic() + self._request_timeout
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

    def _handle_line(self, conn: socket.socket, line: bytes) -> dict | None:
        """The reply to one request line; None if its client hung up before it could start."""
        req = None
        try:
            req = protocol.decode_request(line)
            return handle(self._registry, req, name=self.name, still_wanted=lambda: not _peer_gone(conn))
        except _ClientGone:
            logger.info("control socket %s: %s of '%s' not run: its client hung up before it could start",
                        self.path, req["op"], req["module"])
            return None
        except NativeReloadError as exc:
            return protocol.error_reply(type(exc).__name__, str(exc))
        except Exception as exc:
            logger.exception("control socket %s: request %r failed", self.path, req)
            return protocol.error_reply(type(exc).__name__, str(exc) or repr(exc))


def _peer_gone(conn: socket.socket) -> bool:
    """Has the client closed its end? (It may have given up waiting, e.g. the CLI's timeout.)

    Linux reports POLLHUP on a Unix stream socket once the peer has closed
    (net/unix/af_unix.c sets the survivor's sk_shutdown to SHUTDOWN_MASK); a
    peer that only shut down its writing side still waits for the reply, and
    gives POLLIN/POLLRDHUP, not POLLHUP.
    """
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


_TOO_LONG = protocol.error_reply("ProtocolError", f"request longer than {MAX_REQUEST} bytes; closing the connection")


def _send(conn: socket.socket, reply: dict) -> bool:
    try:
        conn.sendall(protocol.encode(reply))
        return True
    except OSError:
        return False


def _module_status(registry: Any) -> list[dict]:
    modules = []
    for m in registry.status():
        modules.append({
            "name": m.name,
            "path": None if m.path is None else str(m.path),
            "generation": m.generation,
            "images": [{"generation": i.generation, "state": i.state, "in_flight": i.in_flight, "pins": i.pins,
                        "handles": dict(i.handles), "pointer_results": i.pointer_results, "held_by": i.held_by}
                       for i in m.images],
        })
    return modules


class _ClientGone(Exception):
    """A reload or unload whose client is gone: it is not run."""


# Reloads and unloads that arrive over sockets run one at a time per registry,
# each after checking that its client still waits for it: a reload queued
# behind a slow one must not run later for a client that has given up (and
# perhaps retried). Weak keys: a closed registry takes its lock along.
_op_locks: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_op_locks_guard = threading.Lock()


def _op_lock(registry: Any) -> threading.Lock:
    with _op_locks_guard:
        lock = _op_locks.get(registry)
        if lock is None:
            lock = _op_locks[registry] = threading.Lock()
        return lock


def handle(registry: Any, req: Any, *, name: str | None = None,
           still_wanted: Callable[[], bool] | None = None) -> dict:
    """Carry out one decoded request against ``registry``; return the reply.

    Args:
        name: the serving process's name, for ping and status replies
            (default: the program's name).
        still_wanted: called when a reload or unload is about to start (it may
            have waited for another to finish); if it returns False, the
            operation is not run.

    Raises:
        ProtocolError: not an object, unknown op, wrong type, unknown field.
        NativeReloadError: whatever the registry raised (the old image still serves).
    """
    req = protocol.check_request(req)
    op = req["op"]
    pid = os.getpid()
    if op == "ping":
        return {"ok": True, "pid": pid, "name": name or program_name(), "argv": _command_line()}
    if op == "status":
        return {"ok": True, "pid": pid, "name": name or program_name(), "argv": _command_line(),
                "modules": _module_status(registry)}
    name = req["module"]
    with _op_lock(registry):
        if still_wanted is not None and not still_wanted():
            raise _ClientGone(name)
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
        if op == "rollback":
            module = registry.rollback(name, req.get("generation"))
        else:
            module = registry.reload(name, allow_interface_change=req.get("allow_interface_change", False),
                                     canary=req.get("canary", False))
        seconds = time.perf_counter() - started
        change = module.interface_change
    return {"ok": True, "pid": pid, "module": name, "generation_before": before,
            "generation": module.generation, "seconds": seconds, "path": module.path,
            "unchanged_since": module.unchanged_since,
            "interface_change": None if change is None else {"summary": change.summary(), "text": change.render(),
                                                             **change.to_json()}}


_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,64}")


def program_name() -> str:
    """This process's default name: its script's or module's name (``serve.py`` -> ``serve``), else "python"."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 in ("", "-c", "-"):
        return "python"
    base = os.path.basename(argv0)
    if base == "__main__.py":        # python -m package: the package's name
        base = os.path.basename(os.path.dirname(os.path.abspath(argv0)))
    base = base.removesuffix(".py")
    return re.sub(r"[^A-Za-z0-9_.@:+-]", "_", base)[:64] or "python"


def _command_line() -> list[str]:
    # orig_argv: the interpreter and its options too, as ps shows it.
    return list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def check_name(name: str) -> str:
    """``name`` if it can name a serving process (1-64 of ``A-Z a-z 0-9 _ . @ : + -``), else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid process name {name!r}: use 1 to 64 letters, digits and _.@:+- "
                         "(e.g. serve(name=\"api\"))")
    return name


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


def serve(registry: Any, socket_path: str | os.PathLike | None = None, *, name: str | None = None,
          request_timeout: float | None = None) -> Server:
    """Serve ``registry`` on a Unix socket from a daemon thread; return the Server.

    Args:
        socket_path: default ``<pid>.sock`` in ``discovery.serving_dir()`` (the
            usual directory, or a private fallback if someone else took its
            name). An explicit path's directory must be ours and writable by
            nobody else. An existing socket there is replaced only if stale
            (dead pid, or nobody listening).
        name: what the command line calls this process (``--name NAME``,
            ``nativereload ps``); default: the program's name. Several
            processes may share a name (the workers of one server).
        request_timeout: seconds a connection has to deliver each complete
            request, from when it was accepted or got its previous reply
            (default ``DEFAULT_REQUEST_TIMEOUT``).

    Raises:
        ControlError: unsafe or unusable directory, path too long, or a live
            server already answers at ``socket_path``.
        ValueError: ``name`` is not a valid name.
    """
    name = program_name() if name is None else check_name(name)
    if socket_path is None:
        directory = serving_dir()
        path = directory / f"{os.getpid()}.sock"
        sweep(directory)
    else:
        path = Path(socket_path).absolute()
        _check_explicit_parent(path.parent)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH - 8:  # room for the staging name
        raise ControlError(f"socket path {path} is too long for a Unix socket (at most ~{_MAX_SOCKET_PATH - 8} "
                           "bytes)", path=path, hint="pass a shorter socket_path, or set XDG_RUNTIME_DIR")
    if os.path.lexists(path) and not remove_if_stale(path):
        raise ControlError(f"{path} is in use (a live server answers there, or it is not a socket)", path=path,
                           hint="close the other server first, or pass another socket_path")
    listener = _bind_private(path)
    server = Server(registry, path, listener, name=name,
                    request_timeout=DEFAULT_REQUEST_TIMEOUT if request_timeout is None else request_timeout)
    server._start()
    registry._add_closer(server.close)     # registry.close() stops it first
    logger.info("control socket serving %r at %s", name, path)
    return server
