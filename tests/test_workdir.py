"""The registry's private directories: created safely, removed at close, stale ones swept."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading

import pytest

from nativereload import LoadError, Registry

from conftest import SAMPLE_CDEF, install, run_python


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    """A live process of our own: the sweep sends it signal 0, and a broken sweep nothing worse than to it."""
    child = subprocess.Popen(["sleep", "300"])
    yield child.pid
    child.kill()
    child.wait()


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


def test_directories_of_live_processes_are_left_alone(tmpdir_for_copies, live_pid):
    live = make_leftover(tmpdir_for_copies, live_pid)
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
report = {"child": os.waitstatus_to_exitcode(status), "copy_kept": os.path.exists(copy), "pid": os.getpid(),
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
    (entry,) = report["entries_after_child"]         # the parent's directory; the child removed its own at exit
    assert entry.startswith(f"nativereload-{report['pid']}-"), entry
    assert report["entries_after_close"] == []


# -- what makes a directory certainly ours (issue 13) -------------------------------------------------------

from nativereload import workdir as workdir_module  # noqa: E402
from conftest import open_fds  # noqa: E402

OTHER_UID = 65534          # nobody


def needs_root():
    if os.getuid() != 0:
        pytest.skip("needs root (to make files of another user)")


def stale_kinds(tmpdir, live_pid):
    """One leftover of each kind the sweep must keep, and the dead ones it must remove."""
    keep, remove = [], []

    def leftover(name_pid, mode=0o700, lock="file"):
        path = tmpdir / f"nativereload-{name_pid}-{len(keep) + len(remove)}x"
        path.mkdir()
        os.chmod(path, mode)
        (path / "copy.so").write_bytes(b"stale")
        lock_path = path / ".lock"
        if lock == "file":
            lock_path.write_bytes(b"")
        elif lock == "fifo":
            os.mkfifo(lock_path)
        elif lock == "symlink":
            target = tmpdir / f"target-{path.name}"
            target.write_bytes(b"")
            lock_path.symlink_to(target)
        elif lock == "directory":
            lock_path.mkdir()
        return path

    dead = dead_pid()
    remove.append(leftover(dead))
    keep.append(leftover(dead, mode=0o755))            # not the mode we create
    keep.append(leftover(dead, lock=None))             # no lock file: not certainly ours
    keep.append(leftover(dead, lock="fifo"))           # a FIFO: never opened for reading, never waited on
    keep.append(leftover(dead, lock="symlink"))        # never followed
    keep.append(leftover(dead, lock="directory"))
    keep.append(leftover(live_pid))                    # a live pid
    remove.append(leftover(dead_pid()))
    return keep, remove


@pytest.mark.timeout(30)
def test_the_sweep_removes_only_what_is_certainly_ours(tmpdir_for_copies, live_pid):
    keep, remove = stale_kinds(tmpdir_for_copies, live_pid)
    fds = open_fds()
    removed = workdir_module.remove_stale(str(tmpdir_for_copies))
    assert open_fds() == fds                       # no lock descriptor leaked
    assert sorted(removed) == sorted(str(path) for path in remove)
    assert all(path.exists() for path in keep) and not any(path.exists() for path in remove)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_one_directory_kept_does_not_stop_the_sweep(tmpdir_for_copies, monkeypatch, order, live_pid):
    keep, remove = stale_kinds(tmpdir_for_copies, live_pid)
    real_scandir = os.scandir
    monkeypatch.setattr(workdir_module.os, "scandir", lambda path: sorted(
        real_scandir(path), key=lambda entry: entry.name, reverse=order == "reversed")
        if isinstance(path, str) else real_scandir(path))        # (shutil.rmtree scans by descriptor)
    workdir_module.remove_stale(str(tmpdir_for_copies))
    assert not any(path.exists() for path in remove) and all(path.exists() for path in keep)


def test_another_users_directory_or_lock_is_never_removed(tmpdir_for_copies):
    needs_root()
    theirs = make_leftover(tmpdir_for_copies, dead_pid())
    os.chown(theirs, OTHER_UID, OTHER_UID)
    their_lock = make_leftover(tmpdir_for_copies, dead_pid())
    os.chown(their_lock / ".lock", OTHER_UID, OTHER_UID)
    workdir_module.remove_stale(str(tmpdir_for_copies))
    assert theirs.exists() and their_lock.exists()


@pytest.mark.timeout(30)
def test_a_fifo_lock_never_blocks_a_new_registry(tmpdir_for_copies):
    # `mkfifo .lock` in a stale directory made Registry() block for ever (issue 13).
    path = make_leftover(tmpdir_for_copies, dead_pid(), with_lock=False)
    os.mkfifo(path / ".lock")
    Registry(tmpdir=tmpdir_for_copies).close()
    assert path.exists()


def test_a_symlinked_directory_is_never_followed(tmpdir_for_copies, tmp_path):
    target = tmp_path / "precious"
    target.mkdir(mode=0o700)
    (target / ".lock").write_bytes(b"")
    (target / "keep").write_text("x")
    link = tmpdir_for_copies / f"nativereload-{dead_pid()}-evil"
    link.symlink_to(target)
    assert workdir_module.remove_stale(str(tmpdir_for_copies)) == []
    assert (target / "keep").exists() and link.is_symlink()


@pytest.mark.parametrize("mode, sticky_ok", [(0o777, False), (0o770, False), (0o1777, True), (0o755, True)])
def test_no_sweep_where_others_can_rename_entries(tmp_path, caplog, mode, sticky_ok):
    # Another user could rename their directory to nativereload-<dead pid>-x (issue 13).
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    leftover = make_leftover(shared, dead_pid())
    workdir_module._warned_unsafe.discard(str(shared))
    with caplog.at_level("WARNING", logger="nativereload"):
        workdir_module.remove_stale(str(shared))
        workdir_module.remove_stale(str(shared))
    assert leftover.exists() != sticky_ok
    warnings = [r for r in caplog.records if "other users can write to it" in r.getMessage()]
    assert len(warnings) == (0 if sticky_ok else 1)            # warned once
    assert all(r.name == "nativereload" and r.levelname == "WARNING" for r in warnings)
    if warnings:
        assert str(shared) in warnings[0].getMessage() and "chmod +t" in warnings[0].getMessage()


def test_no_sweep_in_another_users_directory(tmp_path):
    needs_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    leftover = make_leftover(theirs, dead_pid())
    os.chown(theirs, OTHER_UID, OTHER_UID)
    assert workdir_module.remove_stale(str(theirs)) == []
    assert leftover.exists()


def test_shared_unsafely():
    st = os.stat_result
    me, other = os.getuid(), OTHER_UID if os.getuid() != OTHER_UID else 1
    assert not workdir_module.shared_unsafely(st((0o40700, 0, 0, 0, me, 0, 0, 0, 0, 0)))
    assert not workdir_module.shared_unsafely(st((0o41777, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    assert workdir_module.shared_unsafely(st((0o40777, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    assert workdir_module.shared_unsafely(st((0o40720, 0, 0, 0, me, 0, 0, 0, 0, 0)))
    assert workdir_module.shared_unsafely(st((0o40700, 0, 0, 0, other, 0, 0, 0, 0, 0)))


def test_nothing_to_sweep_or_an_unreadable_tmpdir(tmp_path):
    assert workdir_module.remove_stale(str(tmp_path / "missing")) == []
    (tmp_path / "unrelated").mkdir()
    assert workdir_module.remove_stale(str(tmp_path)) == []


def test_a_locked_stale_directory_stays(tmpdir_for_copies):
    import fcntl as _fcntl
    locked = make_leftover(tmpdir_for_copies, dead_pid())
    fd = os.open(locked / ".lock", os.O_RDONLY)
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        assert workdir_module.remove_stale(str(tmpdir_for_copies)) == []
    finally:
        os.close(fd)
    assert workdir_module.remove_stale(str(tmpdir_for_copies)) == [str(locked)]


def test_workdir_lifecycle(tmp_path):
    made = workdir_module.Workdir(str(tmp_path), "m")
    assert made.intact() and made.owner == os.getpid()
    assert os.path.basename(made.path).startswith(f"nativereload-{os.getpid()}-")
    assert sorted(os.listdir(made.path)) == [".lock"]
    assert os.stat(os.path.join(made.path, ".lock")).st_mode & 0o777 == 0o600
    (tmp_path / "x").write_text("")
    open(os.path.join(made.path, "copy.so"), "w").close()
    assert made.remove() is False and os.path.isdir(made.path)        # a leftover copy keeps it
    os.unlink(os.path.join(made.path, "copy.so"))
    fds = open_fds()
    assert made.remove() is True and not os.path.exists(made.path)
    assert open_fds() == fds - 1                                       # the lock is released
    assert made.remove() is True                                       # idempotent


def test_a_deleted_or_replaced_workdir_is_forgotten_without_error(tmp_path):
    import shutil as _shutil
    made = workdir_module.Workdir(str(tmp_path), "m")
    _shutil.rmtree(made.path)                  # a tmp cleaner
    assert not made.intact()
    fds = open_fds()
    assert made.remove() is True and open_fds() == fds - 1
    again = workdir_module.Workdir(str(tmp_path), "m")
    _shutil.rmtree(again.path)
    os.mkdir(again.path, 0o700)                # someone else's directory now, under the same name
    (tmp_path / "marker").write_text("")
    open(os.path.join(again.path, "theirs"), "w").close()
    assert not again.intact()
    again.remove_at_exit()
    assert os.path.exists(os.path.join(again.path, "theirs"))      # never deleted


def test_remove_at_exit_deletes_everything(tmp_path):
    made = workdir_module.Workdir(str(tmp_path), "m")
    open(os.path.join(made.path, "leaked.so"), "w").close()
    made.remove_at_exit()
    assert not os.path.exists(made.path)
    made.remove_at_exit()                       # idempotent


def test_workdir_errors_name_the_module(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="module 'm': cannot create a directory for its private copy in") as info:
        workdir_module.Workdir(str(tmp_path / "missing"), "m")
    assert info.value.module == "m" and info.value.path == str(tmp_path / "missing")
    real_open = os.open

    def no_lock(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(workdir_module.os, "open", no_lock)
    with pytest.raises(LoadError, match="module 'm': cannot create the lock file in .*Permission denied"):
        workdir_module.Workdir(str(tmp_path), "m")
    monkeypatch.undo()
    assert [p for p in tmp_path.iterdir() if p.name.startswith("nativereload-")] == []    # nothing left


def test_remove_that_fails_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    made = workdir_module.Workdir(str(tmp_path), "m")
    monkeypatch.setattr(workdir_module.os, "rmdir", lambda path: (_ for _ in ()).throw(OSError(16, "Busy")))
    with caplog.at_level("WARNING", logger="nativereload"):
        assert made.remove() is False
    assert "cannot remove" in caplog.text and "Busy" in caplog.text
    monkeypatch.undo()
    made.remove_at_exit()


FORK_REMOVE = """
import os, sys
from nativereload import workdir
made = workdir.Workdir(sys.argv[1], "m")
pid = os.fork()
if pid == 0:
    made.remove()             # the child's: forgets, never deletes the parent's directory
    made.remove_at_exit()
    os._exit(0)
os.waitpid(pid, 0)
print("kept" if os.path.isdir(made.path) and os.path.exists(os.path.join(made.path, ".lock")) else "deleted")
made.remove()
print("removed" if not os.path.exists(made.path) else "still there")
"""


def test_a_forked_child_never_removes_the_parents_directory(tmp_path):
    result = run_python(FORK_REMOVE.replace("sys.argv[1]", repr(str(tmp_path))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kept", "removed"]


def test_resolve_tmpdir(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert workdir_module.resolve_tmpdir(None) == str(tmp_path)
    monkeypatch.setenv("TMPDIR", "")
    assert workdir_module.resolve_tmpdir(None) == "/tmp"
    assert workdir_module.resolve_tmpdir("rel") == os.path.abspath("rel")


def test_pid_alive(live_pid, monkeypatch):
    assert workdir_module.pid_alive(live_pid) is True
    assert workdir_module.pid_alive(dead_pid()) is False
    sent = []
    monkeypatch.setattr(workdir_module.os, "kill", lambda pid, sig: sent.append((pid, sig)) or
                        (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    assert workdir_module.pid_alive(4242) is True          # another user's process: alive
    assert sent == [(4242, 0)]                            # signal 0: a question, never a signal


def test_error_messages_carry_the_os_words(tmp_path, monkeypatch, caplog):
    missing = tmp_path / "missing"
    with pytest.raises(LoadError) as info:
        workdir_module.Workdir(str(missing), "m")
    assert f"in {missing}: No such file or directory (load refused)" in str(info.value)
    real_open = os.open
    monkeypatch.setattr(workdir_module.os, "open", lambda path, *args, **kwargs: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if str(path).endswith(".lock") else real_open(path, *args, **kwargs))
    with pytest.raises(LoadError) as info:
        workdir_module.Workdir(str(tmp_path), "m")
    assert ": Permission denied (load refused)" in str(info.value)
    monkeypatch.undo()
    made = workdir_module.Workdir(str(tmp_path), "m")
    monkeypatch.setattr(workdir_module.os, "rmdir", lambda path: (_ for _ in ()).throw(OSError(16, "Busy")))
    with caplog.at_level("WARNING", logger="nativereload"):
        made.remove()
    assert f"cannot remove {made.path}: Busy" in caplog.text
    monkeypatch.undo()
    made.remove()


def test_intact_is_a_bool(tmp_path):
    made = workdir_module.Workdir(str(tmp_path), "m")
    assert made.intact() is True
    os.unlink(os.path.join(made.path, ".lock"))
    os.rmdir(made.path)
    assert made.intact() is False
    made.remove()


def test_failed_deletions_never_raise(tmp_path, monkeypatch):
    # Deleting our own directory can fail (a busy file system, a file made undeletable): never an error
    # on the paths that must not fail (a refused load, the interpreter's exit).
    import shutil as _shutil

    real_rmtree = _shutil.rmtree

    def failing_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))
    monkeypatch.setattr(workdir_module.shutil, "rmtree", failing_rmtree)
    made = workdir_module.Workdir(str(tmp_path), "m")
    fds = open_fds()
    made.remove_at_exit()
    assert open_fds() == fds - 1            # the lock descriptor is closed
    real_open = os.open
    monkeypatch.setattr(workdir_module.os, "open", lambda path, *args, **kwargs: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if str(path).endswith(".lock") else real_open(path, *args, **kwargs))
    with pytest.raises(LoadError, match="cannot create the lock file"):
        workdir_module.Workdir(str(tmp_path), "m")
    monkeypatch.undo()
    real_rmtree(made.path, ignore_errors=True)


def test_is_stale_answers_with_a_bool(tmpdir_for_copies, live_pid):
    keep, remove = stale_kinds(tmpdir_for_copies, live_pid)
    missing = tmpdir_for_copies / f"nativereload-{dead_pid()}-gone"
    a_file = tmpdir_for_copies / f"nativereload-{dead_pid()}-file"
    a_file.write_text("")
    os.chmod(a_file, 0o700)
    # (the directory of a live pid is fine as a directory: the sweep checks the pid first)
    not_ours = [*keep[:-1], missing, a_file]
    assert [workdir_module._is_stale(str(path)) for path in not_ours] == [False] * len(not_ours)
    assert [workdir_module._is_stale(str(path)) for path in remove] == [True] * len(remove)
    locked = make_leftover(tmpdir_for_copies, dead_pid())
    import fcntl as _fcntl
    fd = os.open(locked / ".lock", os.O_RDONLY)
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        assert workdir_module._is_stale(str(locked)) is False
    finally:
        os.close(fd)


def test_root_owned_directories_are_not_shared(monkeypatch):
    # As another user: /tmp belongs to root, and root is trusted as the owner of a directory.
    monkeypatch.setattr(workdir_module.os, "getuid", lambda: 1000)
    st = os.stat_result
    assert not workdir_module.shared_unsafely(st((0o40755, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    assert not workdir_module.shared_unsafely(st((0o40755, 0, 0, 0, 1000, 0, 0, 0, 0, 0)))
    assert workdir_module.shared_unsafely(st((0o40755, 0, 0, 0, 1, 0, 0, 0, 0, 0)))


def test_the_sweep_logs_what_it_removed_and_never_raises(tmpdir_for_copies, monkeypatch, caplog):
    leftover = make_leftover(tmpdir_for_copies, dead_pid())
    pid = int(leftover.name.split("-")[1])

    def failing_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))
    monkeypatch.setattr(workdir_module.shutil, "rmtree", failing_rmtree)
    with caplog.at_level("INFO", logger="nativereload"):
        assert workdir_module.remove_stale(str(tmpdir_for_copies)) == [str(leftover)]
    assert f"removed {leftover}, left by process {pid} which is no longer running" in caplog.text


@pytest.mark.timeout(30)
def test_a_fifo_named_like_a_stale_directory_never_blocks(tmpdir_for_copies):
    fifo = tmpdir_for_copies / f"nativereload-{dead_pid()}-fifo"
    os.mkfifo(fifo, 0o700)
    done = []
    thread = threading.Thread(target=lambda: done.append(workdir_module.remove_stale(str(tmpdir_for_copies))),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert done == [[]], "the sweep blocked on a FIFO"
    assert fifo.exists()
