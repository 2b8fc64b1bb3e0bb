"""The registry's private directories: created safely, removed at close, stale ones swept."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess

import pytest

from nativereload import LoadError, Registry

from conftest import SAMPLE_CDEF, install, run_python


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def make_leftover(tmpdir, pid, with_lock=True):
    path = tmpdir / f"nativereload-{pid}-abc123_x"
    path.mkdir(mode=0o700)
    (path / "sample.g1.deadbeef.so").write_bytes(b"stale copy")
    if with_lock:
        (path / ".lock").write_bytes(b"")
    return path


def test_stale_directory_of_dead_process_is_removed_at_start(tmpdir_for_copies):
    leftover = make_leftover(tmpdir_for_copies, dead_pid())
    # Without its lock file a directory is not certainly ours: it stays.
    no_lock = make_leftover(tmpdir_for_copies, dead_pid(), with_lock=False)
    Registry(tmpdir=tmpdir_for_copies).close()
    assert not leftover.exists() and no_lock.exists()


def test_directories_of_live_processes_are_left_alone(tmpdir_for_copies):
    live = make_leftover(tmpdir_for_copies, os.getppid())
    locked = make_leftover(tmpdir_for_copies, dead_pid())
    # The pid looks dead from here, but a live process (us: flock is per open
    # file) holds the lock: a process in another PID namespace, say.
    lock_fd = os.open(locked / ".lock", os.O_RDONLY)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        Registry(tmpdir=tmpdir_for_copies).close()
    finally:
        os.close(lock_fd)
    assert live.exists() and locked.exists()
    unrelated = tmpdir_for_copies / "nativereload-notapid"
    unrelated.mkdir()
    Registry(tmpdir=tmpdir_for_copies).close()
    assert unrelated.exists() and live.exists()
    assert not locked.exists()            # lock released, pid dead: now it goes


def test_a_symlink_is_never_followed(tmpdir_for_copies, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmpdir_for_copies / f"nativereload-{dead_pid()}-evil").symlink_to(target)
    Registry(tmpdir=tmpdir_for_copies).close()
    assert (target / "keep").exists()


def test_directory_is_private_locked_and_removed_at_close(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    reg.load("sample", cdef=SAMPLE_CDEF)
    [directory] = tmpdir_for_copies.iterdir()
    assert directory.name.startswith(f"nativereload-{os.getpid()}-")
    assert directory.stat().st_mode & 0o777 == 0o700
    probe = os.open(directory / ".lock", os.O_RDONLY)
    try:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
    finally:
        os.close(probe)
    assert held
    # A second registry sweeping the same tmpdir leaves a live registry's directory alone.
    Registry(tmpdir=tmpdir_for_copies).close()
    assert directory.exists()
    reg.close()
    assert list(tmpdir_for_copies.iterdir()) == []


def test_no_directory_is_left_while_no_image_is_loaded(moddir, samples, tmpdir_for_copies):
    install(samples["undef"], moddir / "broken.so")
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies) as reg:
        with pytest.raises(LoadError):
            reg.load("broken", cdef=SAMPLE_CDEF)
        assert list(tmpdir_for_copies.iterdir()) == []          # a failed first load leaves nothing
        reg.load("sample", cdef=SAMPLE_CDEF)
        assert len(list(tmpdir_for_copies.iterdir())) == 1
        reg.unload("sample")
        assert list(tmpdir_for_copies.iterdir()) == []          # nothing loaded, nothing on disk


def test_stale_directory_with_any_suffix_is_removed(tmpdir_for_copies):
    leftover = tmpdir_for_copies / f"nativereload-{dead_pid()}-left-over.d"
    leftover.mkdir(mode=0o700)
    (leftover / "x.so").write_bytes(b"x")
    (leftover / ".lock").write_bytes(b"")
    sockets = tmpdir_for_copies / "nativereload-sockets-0"
    sockets.mkdir()
    Registry(tmpdir=tmpdir_for_copies).close()
    assert not leftover.exists() and sockets.exists()


FORK_SCENARIO = """
import json, os, sys
import nativereload
CDEF = sys.argv[3]
reg = nativereload.Registry(path=[sys.argv[1]], tmpdir=sys.argv[2])
mod = reg.load("sample", cdef=CDEF)
copy = reg.status()[0].images[0].copy_path
pid = os.fork()
if pid == 0:
    # A pre-fork worker: calls, reloads (its copies go to a directory of its own), exits normally.
    ok = mod.version() == 1
    reg.reload("sample")
    ok = ok and mod.version() == 1 and os.path.dirname(reg.status()[0].images[0].copy_path) != os.path.dirname(copy)
    sys.exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
report = {"child": os.waitstatus_to_exitcode(status), "copy_kept": os.path.exists(copy),
          "calls": mod.version(), "entries_after_child": sorted(os.listdir(sys.argv[2]))}
reg.close()
report["entries_after_close"] = os.listdir(sys.argv[2])
print(json.dumps(report))
"""


def test_a_forked_child_never_deletes_the_parents_copies(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    code = FORK_SCENARIO.replace("sys.argv[1]", repr(str(moddir))).replace(
        "sys.argv[2]", repr(str(tmpdir_for_copies))).replace("sys.argv[3]", repr(SAMPLE_CDEF))
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["child"] == 0
    assert report["copy_kept"] and report["calls"] == 1
    assert len(report["entries_after_child"]) == 1 and str(os.getpid()) not in report["entries_after_child"][0]
    assert report["entries_after_close"] == []
