"""Module files the loader must never block on, follow into, or load: only a regular file is a library.

`mkfifo m.so` made load() block for ever in os.open (issue 13); a directory got
the hint "free space there". Each kind of file, and a symlink to each, is now
a prompt LoadError that names the kind.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from nativereload import LoadError, Registry

from conftest import SAMPLE_CDEF, install, open_fds, private_copies


def make_fifo(path):
    os.mkfifo(path)


def make_socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()           # the socket file stays


def make_directory(path):
    path.mkdir()


def make_device(path):
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))       # what /dev/zero is
    except PermissionError:         # mknod needs root: a link to one is the same to open()
        path.symlink_to("/dev/zero")


KINDS = {"fifo": (make_fifo, "a FIFO"), "socket": (make_socket, "a socket"),
         "directory": (make_directory, "a directory"), "device": (make_device, "a character device")}


def load_within(reg, seconds, **kwargs):
    """Run reg.load(...) on a thread; fail if it blocks."""
    outcome = []

    def run():
        try:
            outcome.append(reg.load("sample", cdef=SAMPLE_CDEF, **kwargs))
        except Exception as exc:      # noqa: BLE001 - returned to the test
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "load() blocked"
    return outcome[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("link", [False, True], ids=["itself", "symlink"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_module_file_that_is_not_a_regular_file(reg, moddir, tmpdir_for_copies, kind, link):
    make, name = KINDS[kind]
    target = moddir / (f"real-{kind}" if link else "sample.so")
    make(target)
    if link:
        (moddir / "sample.so").symlink_to(target)
    fds = open_fds()
    error = load_within(reg, 10, file=moddir / "sample.so")
    assert isinstance(error, LoadError), error
    message = str(error)
    assert f"it is {name}" in message and "not a regular file" in message, message
    assert "free space" not in message and "(load refused)" in message
    assert "give the path of the built library" in message
    assert error.module == "sample" and error.path == str(moddir / "sample.so")
    assert open_fds() == fds and reg.status() == [] and private_copies(tmpdir_for_copies) == []


@pytest.mark.timeout(60)
def test_a_fifo_at_reload_is_refused_and_the_old_version_serves(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    os.unlink(moddir / "sample.so")
    os.mkfifo(moddir / "sample.so")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(pytest.raises(LoadError, reg.reload, "sample")),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "reload() blocked on a FIFO"
    assert "generation 1 still serving" in str(outcome[0].value) and "FIFO" in str(outcome[0].value)
    assert mod.version() == 1 and mod.generation == 1
    # The registry is not stuck: the next reload, of a real file, works.
    os.unlink(moddir / "sample.so")
    install(samples["v2"], moddir / "sample.so")
    reg.reload("sample")
    assert mod.version() == 2


def test_a_symlink_to_a_library_loads(reg, moddir, samples):
    install(samples["v1"], moddir / "real.so")
    (moddir / "sample.so").symlink_to(moddir / "real.so")
    assert reg.load("sample", cdef=SAMPLE_CDEF).version() == 1


def test_a_file_replaced_by_a_fifo_between_stat_and_open(reg, moddir, samples, monkeypatch):
    # The fstat of the opened descriptor is what counts: a check of the path alone races.
    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    real_open = os.open

    def swap_then_open(path, flags, *args, **kwargs):
        if str(path) == str(moddir / "sample.so"):
            os.unlink(path)
            os.mkfifo(path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(image.os, "open", swap_then_open)
    error = load_within(reg, 10)
    assert isinstance(error, LoadError) and "it is a FIFO (named pipe), not a regular file" in str(error)


def test_an_unreadable_module_file(reg, moddir, samples, monkeypatch):
    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path) == str(moddir / "sample.so"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(image.os, "open", denied)
    with pytest.raises(LoadError, match=r"cannot load .*sample.so: cannot open it: Permission denied \(load refused\)"):
        reg.load("sample", cdef=SAMPLE_CDEF)


@pytest.mark.parametrize("errno_name, hint", [("ENOSPC", "free space there"), ("EDQUOT", "free space there"),
                                              ("EIO", None)])
def test_copy_errors_get_the_hint_that_fits(reg, moddir, samples, monkeypatch, errno_name, hint):
    import errno

    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    code = getattr(errno, errno_name)
    monkeypatch.setattr(image.os, "sendfile", lambda *args: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    message = str(info.value)
    assert os.strerror(code) in message
    if hint:
        assert f"cannot copy it into " in message and f": {os.strerror(code)} (load refused) — {hint}" in message
        assert "TMPDIR" in message
    else:
        assert "free space" not in message
        assert f"cannot copy it from {moddir / 'sample.so'}: {os.strerror(code)} (load refused)" in message


def test_an_unwritable_copy_directory_says_so(reg, moddir, samples, monkeypatch):
    import errno
    import tempfile

    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setattr(image.tempfile, "mkstemp",
                        lambda **kwargs: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(LoadError, match="cannot copy it into .*Read-only file system .* a writable directory"):
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert tempfile.mkstemp        # (the real one is back after the test)


@pytest.mark.timeout(30)
def test_a_source_that_stops_growing_mid_copy_does_not_loop(reg, moddir, samples, monkeypatch):
    # sendfile returning 0 (the file shrank) must end the copy; the ELF check then refuses it.
    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    real_sendfile = os.sendfile
    calls = []

    def short(out_fd, in_fd, offset, count):
        calls.append(offset)
        return real_sendfile(out_fd, in_fd, offset, min(count, 1000)) if offset < 3000 else 0
    monkeypatch.setattr(image.os, "sendfile", short)
    with pytest.raises(LoadError, match="truncated"):
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert len(calls) == 4


def test_only_an_unwritable_directory_gets_the_writable_hint(reg, moddir, samples, monkeypatch):
    import errno

    from nativereload import image

    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setattr(image.tempfile, "mkstemp",
                        lambda **kwargs: (_ for _ in ()).throw(FileNotFoundError(errno.ENOENT, "No such file")))
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert str(info.value).endswith(": No such file (load refused)")
