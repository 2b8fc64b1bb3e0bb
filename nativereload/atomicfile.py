"""Files written by rename: a reader sees the old file or the new one, never part of one.

The compiled-call cache, the notebook magic's builds, the Dask workers' copies
of a build and ``nativereload cdef -o`` all write this way, because another
process (or a registry's copy step) may read the file at any moment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["write_bytes"]


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through ``.NAME.*.partial`` in the same directory, then rename it into place.

    Args:
        durable: fsync the data before the rename, so a crash of the machine
            leaves the old file or the whole new one.
        mode: the permission bits the file gets before the rename (default:
            mkstemp's 0600 less the umask).

    Raises:
        OSError: the file could not be written; the partial file is removed
            and ``path`` is as it was (also for any other exception).
    """
    directory, name = os.path.split(os.fspath(path))
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if mode is not None:
            os.chmod(partial, mode)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
