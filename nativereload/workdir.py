"""A registry's private directories for its copies: ``<tmpdir>/nativereload-<pid>-<random>/``.

A registry has one :class:`Workdir` per tmpdir it copied into (``$TMPDIR`` is
read at each load, so it can change while the registry serves); its
:class:`Workdirs` keeps them, makes the current one on first use and removes
those no open image lives in. Every directory still open when the process
exits is removed then (no mapping outlives the process).

Contract:
  - created with mkdtemp (mode 0700, a fresh name, mkdir never follows a
    symlink planted in its place), holding ``.lock``, a regular file the
    owning process keeps ``flock``-ed for as long as the directory is in use;
  - a directory deleted behind the registry's back (``systemd-tmpfiles``, a
    cron job cleaning /tmp) is noticed (:meth:`Workdir.intact`), and removing
    it then is not an error;
  - :func:`remove_stale` deletes such directories left by processes that
    died (crash, SIGKILL), and only those it is certain are ours: named
    ``nativereload-<pid>-*``, a real directory (never a symlink) owned by this
    user with mode 0700, holding a regular ``.lock`` file of ours that no live
    process holds (pids are reused, and a process in another PID namespace
    sharing /tmp may have a pid that is "dead" from here), and whose pid is
    not alive. It never deletes anything in a directory that another user
    can write to without the sticky bit (that user could have renamed one of
    their directories, or ours, into place): there it warns once instead.
  - Nothing here ever blocks: every file is opened ``O_NONBLOCK |
    O_NOFOLLOW`` and checked to be a regular file before it is locked, and
    locks are only ever tried (``LOCK_NB``), so a FIFO, a device or a symlink
    planted as ``.lock`` is skipped, not waited on.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from typing import Collection, Iterator

from .errors import LoadError

__all__ = ["Workdir", "Workdirs", "pid_alive", "remove_stale", "resolve_tmpdir"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PREFIX = "nativereload-"
_STALE_NAME = re.compile(r"^nativereload-(\d+)-.+$")
_LOCK_NAME = ".lock"
_MODE = 0o700
# Never block, never follow a symlink, never leak into a child.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

_warned_unsafe: set[str] = set()


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
        owner: the pid that made it (a forked child never deletes it).
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
            self._identity = _identity(os.lstat(self.path))
            self._lock_fd = os.open(os.path.join(self.path, _LOCK_NAME),
                                    os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise LoadError(
                f"module '{module}': cannot create the lock file in {self.path}: {exc.strerror or exc} "
                "(load refused) — set TMPDIR, or pass Registry(tmpdir=...), to a writable directory",
                module=module, path=tmpdir, reason=str(exc)) from None

    def intact(self) -> bool:
        """Is the directory still there, the one we made (not deleted, nor replaced by another)?"""
        try:
            return _identity(os.lstat(self.path)) == self._identity
        except OSError:
            return False

    def remove(self) -> bool:
        """Delete the directory if nothing but the lock is left in it; return True if it is gone (for us).

        A directory still holding files (a leaked image's copy) is kept, and
        its lock stays held until the process exits. In a forked child, the
        parent's directory is only forgotten, never deleted. A directory
        already deleted (a tmp cleaner) or replaced is forgotten: never an error.
        """
        if self._lock_fd is None:
            return True
        if self.owner != os.getpid() or not self.intact():
            self._forget()
            return True
        try:
            leftovers = [name for name in os.listdir(self.path) if name != _LOCK_NAME]
            if leftovers:
                return False
            os.unlink(os.path.join(self.path, _LOCK_NAME))
            os.rmdir(self.path)
        except FileNotFoundError:
            pass                        # deleted under us: what we wanted
        except OSError as exc:
            logger.warning("cannot remove %s: %s", self.path, exc.strerror or exc)
            return False
        self._forget()
        return True

    def remove_at_exit(self) -> None:
        """Delete the directory and everything in it: the process is ending, so no mapping outlives it."""
        if self._lock_fd is not None and self.owner == os.getpid() and self.intact():
            shutil.rmtree(self.path, ignore_errors=True)
        self._forget()

    def _forget(self) -> None:
        """Close our descriptor of the lock (a forked child's copy of it: the owner's lock stays held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class Workdirs:
    """A registry's directories, one per tmpdir it has copied into.

    Not thread-safe on its own: the registry calls it under its locks (see
    :meth:`current` and :meth:`release_idle`).
    """

    def __init__(self, tmpdir: str | os.PathLike | None) -> None:
        self._tmpdir = tmpdir
        self._by_tmpdir: dict[str, Workdir] = {}

    def __iter__(self) -> Iterator[Workdir]:
        return iter(list(self._by_tmpdir.values()))

    def __len__(self) -> int:
        return len(self._by_tmpdir)

    def current(self, module: str) -> Workdir:
        """The directory in the current tmpdir (made, after a sweep of stale directories, on first use).

        Call with the registry's admin lock held (loads are serialized by it).
        """
        tmpdir = resolve_tmpdir(self._tmpdir)
        workdir = self._by_tmpdir.get(tmpdir)
        if workdir is not None and workdir.owner == os.getpid() and not workdir.intact():
            # Deleted while we served (a tmp cleaner): images in it still run
            # from their mappings; new copies need a new directory.
            logger.warning("%s was deleted while in use; making a new one", workdir.path)
            workdir.remove()
            _open_workdirs.discard(workdir)
            workdir = None
        if workdir is None or workdir.owner != os.getpid():     # none yet, or the parent's (we forked)
            remove_stale(tmpdir)
            workdir = Workdir(tmpdir, module)
            _open_workdirs.add(workdir)
            self._by_tmpdir[tmpdir] = workdir
        return workdir

    def release_idle(self, busy: Collection[str]) -> None:
        """Remove the directories whose path is not in ``busy`` (the directories open images live in).

        Call with the registry's state lock held: a load in progress must not
        see its directory vanish.
        """
        for tmpdir, workdir in list(self._by_tmpdir.items()):
            if workdir.path not in busy and workdir.remove():
                del self._by_tmpdir[tmpdir]
                _open_workdirs.discard(workdir)


# Every directory some registry of this process has open.
_open_workdirs: set[Workdir] = set()


@atexit.register
def _remove_workdirs_at_exit() -> None:
    # The process is ending: no mapping outlives it, so every copy can go,
    # including leaked images' and those of registries never closed.
    for workdir in list(_open_workdirs):
        workdir.remove_at_exit()
    _open_workdirs.clear()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    """Is there a process ``pid`` (of any user) in this PID namespace?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


def shared_unsafely(st: os.stat_result) -> bool:
    """Can a user other than us (and root) add, rename or delete entries in this directory?

    Yes if it is group- or world-writable without the sticky bit (as /tmp has),
    or if it belongs to another user (who can always write to it).
    """
    if st.st_uid not in (os.getuid(), 0):
        return True
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not st.st_mode & stat.S_ISVTX


def remove_stale(tmpdir: str) -> list[str]:
    """Delete the private directories in ``tmpdir`` left by dead processes; return their paths.

    See the module docstring for what makes a directory certainly ours.
    Never raises for an unreadable tmpdir, and never blocks.
    """
    removed: list[str] = []
    try:
        parent = os.stat(tmpdir)
        entries = list(os.scandir(tmpdir))
    except OSError:
        return removed
    candidates = [entry for entry in entries if _STALE_NAME.match(entry.name)]
    if not candidates:
        return removed
    if shared_unsafely(parent):
        if tmpdir not in _warned_unsafe:
            _warned_unsafe.add(tmpdir)
            logger.warning("not removing directories left by dead processes in %s: other users can write to it "
                           "without the sticky bit, so a directory named like ours might not be ours — give "
                           "nativereload a private TMPDIR, or set the sticky bit (chmod +t)", tmpdir)
        return removed
    for entry in candidates:
        pid = int(_STALE_NAME.match(entry.name).group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if _is_stale(entry.path):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
            logger.info("removed %s, left by process %d which is no longer running", entry.path, pid)
    return removed


def _is_stale(path: str) -> bool:
    """Is ``path`` a directory of ours (see the module docstring) whose lock no process holds?"""
    uid = os.getuid()
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:                  # gone, a symlink (ELOOP), not a directory, not ours to read
        return False
    try:
        st = os.fstat(dir_fd)
        if st.st_uid != uid or stat.S_IMODE(st.st_mode) != _MODE:
            return False
        try:
            lock_fd = os.open(_LOCK_NAME, _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError:              # no lock file (not certainly ours), a symlink, unreadable
            return False
        try:
            lock = os.fstat(lock_fd)
            if not stat.S_ISREG(lock.st_mode) or lock.st_uid != uid:
                return False         # a FIFO, socket or device: not ours, and never waited on
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:          # EWOULDBLOCK: a live process (another PID namespace?) still uses it
                return False
            return True
        finally:
            os.close(lock_fd)
    finally:
        os.close(dir_fd)
