"""May this process load that file? Who else could have written it, and is its content one we allow?

Loading a library runs its code in the process. A library that another user
can rewrite, or that sits in a directory where another user can replace it,
lets that user run code here at the next reload. So before copying, the
registry checks, the way OpenSSH's ``StrictModes`` checks ``authorized_keys``:
  - the file (as opened: after any symlink) belongs to this user or root and is
    not writable by group or others;
  - every directory on its path, and on the path of the file a symlink points
    to, belongs to this user or root and is not writable by group or others —
    unless it has the sticky bit (as /tmp has: others cannot rename or delete
    what is ours there). A group-writable directory whose group is this
    user's private group (same name as the user, no other members) is fine.
Refused by default (:class:`~nativereload.LoadError` naming the culprit);
``Registry(trust_writable=True)`` allows it.

Content: ``Registry(trusted_hashes=...)`` is either a collection of SHA-256
digests (hex) or a callable ``(path, sha256_hex) -> bool``. The digest is of
the private copy about to be loaded (no one else can write it), so what is
checked is exactly what runs.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import stat
from typing import Callable, Collection, Union

from .errors import LoadError

__all__ = ["Trust", "TrustedHashes"]

TrustedHashes = Union[Collection[str], Callable[[str, str], bool], None]

_HASH_CHUNK = 1 << 20


class Trust:
    """A registry's trust policy: applied to each file it loads.

    Args:
        trust_writable: load files others could have written (skip the ownership and mode checks).
        trusted_hashes: SHA-256 digests (hex) allowed, or a callable ``(path, digest) -> bool``; None: any.
    """

    def __init__(self, trust_writable: bool = False, trusted_hashes: TrustedHashes = None) -> None:
        self.trust_writable = bool(trust_writable)
        if trusted_hashes is None or callable(trusted_hashes):
            self._allow = trusted_hashes
        elif isinstance(trusted_hashes, (str, bytes)):
            raise TypeError("trusted_hashes must be a collection of hex digests or a callable, not one string")
        else:
            digests = frozenset(str(digest).lower() for digest in trusted_hashes)
            self._allow = lambda _path, digest: digest in digests
        self._uid = os.getuid()

    def check_source(self, path: str, fd: int, *, module: str, refused: str) -> None:
        """Check who could have written ``path`` (opened as ``fd``), before it is copied.

        Raises:
            LoadError: the file or a directory on its path is writable by another user.
        """
        if self.trust_writable:
            return
        problem = self._file_problem(os.fstat(fd), "it")
        if problem is None:
            for directory in _directories(path):
                try:
                    st = os.stat(directory)
                except OSError:
                    continue            # gone since the open: the copy is already ours
                problem = self._directory_problem(st, directory)
                if problem:
                    break
        if problem:
            raise LoadError(
                f"module '{module}': refusing to load {path}: {problem}, so another user could replace the code "
                f"this process runs ({refused}) — make it yours and writable only by you (chmod go-w), or pass "
                "Registry(trust_writable=True) if you trust every user who can write there",
                module=module, path=path, reason=problem)

    def check_content(self, path: str, copy_fd: int, *, module: str, refused: str) -> None:
        """Check the private copy's SHA-256 against ``trusted_hashes`` (no-op without one).

        Raises:
            LoadError: the digest is not allowed.
        """
        if self._allow is None:
            return
        digest = _sha256(copy_fd)
        try:
            allowed = bool(self._allow(path, digest))
        except Exception as exc:        # the user's callable failed: refuse, and say why
            raise LoadError(
                f"module '{module}': the trusted_hashes callable failed for {path}: {exc!r} ({refused})",
                module=module, path=path, reason=f"trusted_hashes raised {exc!r}") from exc
        if not allowed:
            raise LoadError(
                f"module '{module}': {path} has SHA-256 {digest}, which trusted_hashes does not allow "
                f"({refused}) — if this build is yours, add its digest (sha256sum {path})",
                module=module, path=path, reason=f"sha256 {digest} not trusted")

    def _owner_ok(self, uid: int) -> bool:
        return uid == self._uid or uid == 0

    def _file_problem(self, st: os.stat_result, name: str) -> str | None:
        if not self._owner_ok(st.st_uid):
            return f"{name} belongs to {_user(st.st_uid)}"
        if st.st_mode & stat.S_IWOTH:
            return f"{name} is writable by every user (mode {stat.S_IMODE(st.st_mode):o})"
        if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, self._uid):
            return f"{name} is writable by group {_group(st.st_gid)} (mode {stat.S_IMODE(st.st_mode):o})"
        return None

    def _directory_problem(self, st: os.stat_result, directory: str) -> str | None:
        if st.st_mode & stat.S_ISVTX and self._owner_ok(st.st_uid):
            return None                 # sticky: others may add files, never replace ours
        return self._file_problem(st, f"its directory {directory}")


def _directories(path: str) -> list[str]:
    """Every directory on the path as given and on the path it resolves to, deepest first, without repeats."""
    seen: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        directory = os.path.dirname(start)
        while True:
            if directory not in seen:
                seen.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
    return seen


def _private_group(gid: int, uid: int) -> bool:
    """Is ``gid`` a user private group of ``uid`` (named after the user, no other members)?"""
    try:
        group = grp.getgrgid(gid)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return group.gr_name == user.pw_name and user.pw_gid == gid and set(group.gr_mem) <= {user.pw_name}


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _HASH_CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)
