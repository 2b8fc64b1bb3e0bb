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

__all__ = ["Target", "check_private_dir", "default_socket_dir", "default_socket_path", "discover",
           "remove_if_stale", "serving_dir", "socket_dirs", "sweep"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """A process reachable through its control socket (``pid`` is None for a socket given by path)."""

    pid: int | None
    path: Path


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


def discover(*, cleanup: bool = True) -> list[Target]:
    """The sockets of this user's live processes (in ``socket_dirs()``), by pid.

    Sockets of dead processes are removed on the way (``cleanup``). No
    directory means no process serves. A directory that is not ours is
    never trusted: it is skipped with a warning.
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
    return found
