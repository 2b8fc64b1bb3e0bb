"""A tmp cleaner (systemd-tmpfiles, a cron job) deletes the registry's directory, or a copy, while it serves.

Before issue 13 every later reload failed with LoadError (the directory was
cached and never made again) and close() raised FileNotFoundError. Now the
next load or reload makes what it needs, status() says which serving image's
copy is gone (it still runs from its mapping), and close() never raises.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from nativereload import Registry

from conftest import SAMPLE_CDEF, install, mapped_paths, open_fds


def the_directory(reg):
    [image] = reg.status()[0].images
    return os.path.dirname(image.copy_path)


def test_directory_deleted_while_serving(reg, moddir, samples, tmpdir_for_copies, caplog):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    old_directory = the_directory(reg)
    fds = open_fds()
    shutil.rmtree(old_directory)
    [status] = reg.status()
    assert status.images[0].copy_deleted is True             # the mapping still serves
    assert mod.version() == 1
    install(samples["v2"], moddir / "sample.so")
    with caplog.at_level("WARNING", logger="nativereload"):
        reg.reload("sample")
    assert f"{old_directory} was deleted while in use; making a new one" in caplog.text
    assert open_fds() == fds                      # the old directory's lock closed, the new one's open
    from nativereload import workdir as workdir_module
    assert [w.path for w in workdir_module._open_workdirs if w.path == old_directory] == []
    assert mod.version() == 2 and mod.generation == 2
    assert the_directory(reg) != old_directory and os.path.isdir(the_directory(reg))
    assert [image.copy_deleted for image in reg.status()[0].images] == [False]
    reg.reload("sample")                                       # and the next one too
    assert mod.generation == 3
    assert reg.close(timeout=10) is True
    assert os.listdir(tmpdir_for_copies) == []


def test_copy_deleted_while_serving(reg, moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    [image] = reg.status()[0].images
    os.unlink(image.copy_path)
    assert reg.status()[0].images[0].copy_deleted is True
    assert image.copy_path in mapped_paths()                   # shown as "(deleted)" in maps: still mapped
    assert mod.add(2, 3) == 5
    reg.reload("sample")
    assert mod.version() == 1 and mod.generation == 2
    assert reg.close(timeout=10) is True
    assert os.listdir(tmpdir_for_copies) == []


def test_close_after_the_directory_is_gone_never_raises(moddir, samples, tmpdir_for_copies, gate_impl):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    reg.load("sample", cdef=SAMPLE_CDEF)
    shutil.rmtree(the_directory(reg))
    assert reg.close(timeout=10) is True
    assert reg.close() is True
    assert os.listdir(tmpdir_for_copies) == []


@pytest.mark.timeout(60)
def test_deleted_while_a_call_is_in_flight(reg, moddir, samples, tmpdir_for_copies):
    # The old image drains after the cleaner ran: closing it must not fail on the missing copy.
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    read_fd, write_fd = os.pipe()
    results = []
    caller = threading.Thread(target=lambda: results.append(mod.wait_fd(read_fd)))
    caller.start()
    try:
        while reg.status()[0].images[0].in_flight == 0:
            threading.Event().wait(0.01)
        shutil.rmtree(the_directory(reg))
        reg.reload("sample")
        assert [i.state for i in reg.status()[0].images] == ["retired", "active"]
    finally:
        os.write(write_fd, b"x")
        caller.join(30)
        os.close(read_fd)
        os.close(write_fd)
    assert results and reg.wait_drained(timeout=10)
    assert [i.state for i in reg.status()[0].images] == ["active"]


def test_a_load_after_the_directory_is_gone(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    install(samples["v2"], moddir / "other.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    shutil.rmtree(the_directory(reg))
    assert reg.load("other", cdef=SAMPLE_CDEF).version() == 2
