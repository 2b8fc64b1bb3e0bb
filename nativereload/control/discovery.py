"""Where control sockets live, and how the command line finds the live ones.

The place is found from the environment alone, so the command line finds a
process's socket without being told:

    $XDG_RUNTIME_DIR/nativereload/<pid>.sock                 if XDG_RUNTIME_DIR is set
    ${TMPDIR:-/tmp}/nativereload-sockets-<uid>/<pid>.sock    otherwise

The directory is created 0700 and must be a real directory owned by us: one
owned by someone else, a symlink or a file is refused rather than trusted.
Since anyone can create that name first in a shared ``/tmp``, a refused
directory does not stop ``serve()``: it serves from a fallback beside it,
``<that name>.<random>`` (made by mkdtemp: 0700, ours, a name nobody can
take first), reused by later servers, and ``discover()`` looks in every
fallback that is ours and private as well. A socket
whose pid is dead, or on which nobody listens, is stale: ``discover()`` and
the next ``serve()`` remove it (SIGKILLed servers leave theirs behind).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path

from ..errors import ControlError
from ..workdir import pid_alive
from .client import request

__all__ = ["Target", "check_private_dir", "default_socket_dir", "default_socket_path", "describe", "discover",
           "find_targets", "remove_if_stale", "serving_dir", "socket_dirs", "sweep"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """A process reachable through its control socket.

    ``pid`` is None for a socket given by path and not asked yet; ``name``
    and ``argv`` (what it calls itself, its command line) are filled in by
    ``describe()``.
    """

    pid: int | None
    path: Path
    name: str | None = None
    argv: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How a result line names the process: ``pid 4242 [api]``."""
        label = f"pid {self.pid}" if self.pid is not None else str(self.path)
        return f"{label} [{self.name}]" if self.name else label

    @property
    def description(self) -> str:
        """How a list of processes names each: ``pid 4242 [api] python serve.py --port 8000``."""
        if not self.argv:
            return self.label
        command = self.command
        return f"{self.label} {command if len(command) <= 60 else command[:57] + '...'}"

    @property
    def command(self) -> str:
        """The command line on one line (``python -c`` code has newlines)."""
        return " ".join(" ".join(self.argv).split())


def default_socket_dir() -> Path:
    """The directory this user's sockets live in, from the environment alone."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "nativereload"
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"nativereload-sockets-{os.getuid()}"


def default_socket_path(pid: int | None = None) -> Path:
    """``default_socket_dir() / "<pid>.sock"`` (this process's pid by default)."""
    return default_socket_dir() / f"{os.getpid() if pid is None else int(pid)}.sock"


def check_private_dir(path: Path, *, create: bool) -> None:
    """Make sure ``path`` is a real directory, owned by us, mode 0700.

    Created 0700 if missing (and ``create``). An existing one owned by someone
    else, or a symlink, is refused: whoever owns it could swap our socket.
    One of ours with wider permissions is tightened.

    Raises:
        ControlError: missing (and not ``create``), not a directory, or not ours.
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


def _fallbacks(primary: Path) -> list[Path]:
    """The fallback directories beside ``primary`` that are ours: real directories, our uid, mode 0700."""
    prefix = primary.name + "."
    found = []
    try:
        entries = list(os.scandir(primary.parent))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077:
            found.append(Path(entry.path))
    return sorted(found)


def serving_dir() -> Path:
    """The directory ``serve()`` binds in: ``default_socket_dir()``, or a private fallback if it is refused.

    Someone else may have taken the usual name first (in a shared, sticky
    ``/tmp`` anyone can make ``nativereload-sockets-<uid>``): that must not
    stop this process from serving. The fallback is reused if one of ours
    exists, else made by mkdtemp. A warning says what happened and how to
    get the usual place back.

    Raises:
        ControlError: the directory's parent cannot be written (no fallback
            can be made there either).
    """
    primary = default_socket_dir()
    try:
        check_private_dir(primary, create=True)
        return primary
    except ControlError as exc:
        if not os.path.lexists(primary):
            raise      # it could not be created: a fallback beside it could not either
        refused = exc
    existing = _fallbacks(primary)
    if existing:
        chosen = existing[0]
    else:
        try:
            chosen = Path(tempfile.mkdtemp(prefix=primary.name + ".", dir=primary.parent))
        except OSError as exc:
            raise ControlError(f"{refused}; and no fallback directory could be made in {primary.parent}: "
                               f"{exc.strerror or exc}", path=primary,
                               hint="set XDG_RUNTIME_DIR (or TMPDIR) to a private directory") from None
    logger.warning("%s; serving from %s instead (the command line looks there too). To use the usual place "
                   "again, have %s removed by its owner or root, or set XDG_RUNTIME_DIR to a private directory",
                   refused, chosen, primary)
    return chosen


def socket_dirs() -> list[Path]:
    """Every directory this user's sockets may be in: the usual one, if it is ours, then its fallbacks."""
    primary = default_socket_dir()
    found = []
    if os.path.lexists(primary):
        try:
            check_private_dir(primary, create=False)
            found.append(primary)
        except ControlError as exc:
            logger.warning("%s; looking only in the fallback directories beside it", exc)
    return found + _fallbacks(primary)


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


def remove_if_stale(path: Path) -> bool:
    """Remove the socket ``path`` if its pid is dead or nobody listens; True if removed (or already gone)."""
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


def sweep(directory: Path) -> None:
    """Remove the sockets of dead processes in ``directory`` (SIGKILLed servers leave them)."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.endswith(".sock") and entry.name[:-5].isdigit():
            try:
                if not pid_alive(int(entry.name[:-5])):
                    remove_if_stale(entry)
            except OSError as exc:
                logger.debug("cannot check %s: %s", entry, exc)


def describe(target: Target, timeout: float = 2.0) -> Target:
    """``target`` with its pid, name and command line, as the process answers a ping (unchanged if it does not)."""
    try:
        reply = request(target.path, "ping", timeout=timeout)
    except ControlError as exc:
        logger.debug("cannot describe %s: %s", target.path, exc)
        return target
    if not reply.get("ok"):
        return target
    pid = reply.get("pid")
    name = reply.get("name")
    argv = reply.get("argv")
    return dataclasses.replace(
        target, pid=pid if isinstance(pid, int) else target.pid, name=name if isinstance(name, str) else None,
        argv=tuple(str(a) for a in argv) if isinstance(argv, list) else ())


def discover(*, cleanup: bool = True, describe_each: bool = False) -> list[Target]:
    """The sockets of this user's live processes (in ``socket_dirs()``), by pid.

    Sockets of dead processes are removed on the way (``cleanup``). No
    directory means no process serves. A directory that is not ours is
    never trusted: it is skipped with a warning. ``describe_each`` asks each
    process its name and command line (one ping each).
    """
    found = []
    for directory in socket_dirs():
        try:
            entries = sorted(directory.iterdir())
        except OSError as exc:
            logger.warning("cannot list the socket directory %s: %s", directory, exc.strerror or exc)
            continue
        for entry in entries:
            stem = entry.name[:-5] if entry.name.endswith(".sock") else ""
            if not stem.isdigit():
                continue
            try:
                is_sock = stat.S_ISSOCK(os.lstat(entry).st_mode)
            except FileNotFoundError:
                continue
            if not is_sock:
                continue
            if cleanup and remove_if_stale(entry):
                continue
            found.append(Target(int(stem), entry))
    found.sort(key=lambda t: t.pid or 0)
    if describe_each:
        found = [describe(target) for target in found]
    return found


def _listing(targets: list[Target]) -> str:
    return "; ".join(t.description for t in targets)


def find_targets(*, socket: str | os.PathLike | None = None, pid: int | None = None, name: str | None = None,
                 every: bool = False) -> list[Target]:
    """The processes a command addresses, by the command line's rules.

    ``socket``: that socket. ``pid``: that process. ``name``: the processes
    serving under that name (several only with ``every``). ``every`` alone:
    every live process of this user. None of them: the only live process
    of this user.

    Raises:
        ControlError: nothing matches, or several do and ``every`` is not set;
            the message lists the live processes (pid, name, command line).
    """
    if socket is not None:
        path = Path(socket)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}", path=path,
                               hint="is the process running, and did it call reg.serve()?") from None
        except OSError as exc:
            raise ControlError(f"cannot reach {path}: {exc.strerror or exc}", path=path,
                               hint="the socket may belong to another user; run as that user") from None
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{path} is not a socket", path=path,
                               hint="pass the path a process's reg.serve() printed (Server.path), or use --pid PID")
        return [describe(Target(None, path))]
    where = " or ".join(str(d) for d in socket_dirs()) or str(default_socket_dir())
    live = discover(describe_each=True)
    if pid is not None:
        chosen = [t for t in live if t.pid == pid]
        if not chosen:
            raise ControlError(f"process {pid} has no live control socket in {where}",
                               hint=f"live processes: {_listing(live)}" if live
                               else "is it running, and did it call reg.serve()?")
        return chosen
    if not live:
        raise ControlError(f"no nativereload process of this user is serving (looked in {where})",
                           hint="call reg.serve() in your program; the socket directory comes from XDG_RUNTIME_DIR, "
                                "else TMPDIR (it must match between your program and this shell)")
    if name is not None:
        chosen = [t for t in live if t.name == name]
        if not chosen:
            raise ControlError(f"no live process is named {name!r}",
                               hint=f"live processes: {_listing(live)} (a process names itself with "
                                    "reg.serve(name=...); the default is its program's name)")
        if len(chosen) > 1 and not every:
            raise ControlError(f"{len(chosen)} processes are named {name!r}: {_listing(chosen)}",
                               hint="choose one with --pid PID, or address them all with --name NAME --all")
        return chosen
    if every or len(live) == 1:
        return live
    raise ControlError(f"{len(live)} processes are serving: {_listing(live)}",
                       hint="choose one with --name NAME, --pid PID or --socket PATH, or address them all with --all")
