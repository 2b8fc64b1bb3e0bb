"""A registry's private directory for its copies: ``<tmpdir>/nativereload-<pid>-<random>/``.

Contract:
  - created with mkdtemp (mode 0700, a fresh name, mkdir never follows a
    symlink planted in its place), holding ``.lock``, a file the owning
    process keeps ``flock``-ed for as long as the directory is in use;
  - :func:`remove_stale` deletes such directories left by processes that
    died (crash, SIGKILL). It removes one only if its pid is not alive *and*
    no live process holds its lock: pids are reused, and a process in another
    PID namespace sharing /tmp may have a pid that is "dead" from here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile

from .errors import LoadError

__all__ = ["Workdir", "pid_alive", "remove_stale", "resolve_tmpdir"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PREFIX = "nativereload-"
_STALE_NAME = re.compile(r"^nativereload-(\d+)-.+$")
_LOCK_NAME = ".lock"


def resolve_tmpdir(tmpdir: str | os.PathLike | None) -> str:
    """The directory for copies: ``tmpdir`` if given, else ``$TMPDIR``, else /tmp (read now, every time)."""
    if tmpdir is not None:
        return os.path.abspath(os.fspath(tmpdir))
    return os.path.abspath(os.environ.get("TMPDIR") or "/tmp")


class Workdir:
    """One private, locked directory in one tmpdir.

    Attributes:
        tmpdir: the parent directory.
        path: the private directory.
    """

    def __init__(self, tmpdir: str, module: str) -> None:
        """Create the directory and take its lock.

        Raises:
            LoadError: naming ``module`` (the load that needed it), if the
            directory cannot be created there.
        """
        self.tmpdir = tmpdir
        # A forked child (a pre-fork server's worker) inherits this object; only
        # the process that made the directory may delete it or anything in it.
        self.owner = os.getpid()
        try:
            self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=tmpdir)
        except OSError as exc:
            raise LoadError(
                f"module '{module}': cannot create a directory for its private copy in {tmpdir}: "
                f"{exc.strerror or exc} (load refused) — set TMPDIR, or pass Registry(tmpdir=...), to a "
                "writable directory", module=module, path=tmpdir, reason=str(exc)) from None
        try:
            self._lock_fd = os.open(os.path.join(self.path, _LOCK_NAME),
                                    os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise LoadError(
                f"module '{module}': cannot create the lock file in {self.path}: {exc.strerror or exc} "
                "(load refused) — set TMPDIR, or pass Registry(tmpdir=...), to a writable directory",
                module=module, path=tmpdir, reason=str(exc)) from None

    def remove(self) -> bool:
        """Delete the directory if nothing but the lock is left in it; return True if it is gone (for us).

        A directory still holding files (a leaked image's copy) is kept, and
        its lock stays held until the process exits. In a forked child, the
        parent's directory is only forgotten, never deleted.
        """
        if self._lock_fd is None:
            return True
        if self.owner != os.getpid():
            self._forget()
            return True
        leftovers = [name for name in os.listdir(self.path) if name != _LOCK_NAME]
        if leftovers:
            return False
        os.unlink(os.path.join(self.path, _LOCK_NAME))
        os.rmdir(self.path)
        os.close(self._lock_fd)
        self._lock_fd = None
        return True

    def remove_at_exit(self) -> None:
        """Delete the directory and everything in it: the process is ending, so no mapping outlives it."""
        if self._lock_fd is not None and self.owner == os.getpid():
            shutil.rmtree(self.path, ignore_errors=True)
        self._forget()

    def _forget(self) -> None:
        """Close our descriptor of the lock (a forked child's copy of it: the owner's lock stays held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def pid_alive(pid: int) -> bool:
    """Is there a process ``pid`` (of any user) in this PID namespace?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


def remove_stale(tmpdir: str) -> list[str]:
    """Delete the private directories in ``tmpdir`` left by dead processes; return their paths.

    Only directories owned by this user, whose pid is dead and whose lock no
    one holds, are removed. Never raises for an unreadable tmpdir.
    """
    removed = []
    try:
        entries = list(os.scandir(tmpdir))
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        match = _STALE_NAME.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            lock_fd = os.open(os.path.join(entry.path, _LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            lock_fd = None
        except OSError:
            continue
        try:
            if lock_fd is not None:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue          # a live process (another PID namespace?) still uses it
                    raise
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
            logger.info("removed %s, left by process %d which is no longer running", entry.path, pid)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
    return removed
