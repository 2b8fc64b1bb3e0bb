"""Reloading: calls in flight, draining, transactional failure, fresh copies."""

from __future__ import annotations

import json
import os
import threading

import pytest

from nativereload import (InterfaceError, LoadError, ModuleNotFound, ModuleUnloaded, Registry, SymbolError)

from conftest import SAMPLE_CDEF, install, mapped_paths, open_fds, private_copies, run_python


@pytest.fixture
def loaded(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    return reg.load("sample", cdef=SAMPLE_CDEF)


class BlockedCall:
    """A thread blocked inside ``module.wait_fd`` until :meth:`release`; ``result`` is what it returned."""

    def __init__(self, func):
        self._read, self._write = os.pipe()
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(func,), daemon=True)
        self.thread.start()

    def _run(self, func):
        self.result = func(self._read)

    def release(self):
        os.write(self._write, b"x")
        self.thread.join(10)
        assert not self.thread.is_alive()
        os.close(self._read)
        os.close(self._write)
        return self.result


def wait_until_in_flight(reg, generation, count=1):
    """Spin until status() shows ``count`` calls in flight on ``generation`` (the thread entered the C call)."""
    for _ in range(10000):
        for image in reg.status()[0].images:
            if image.generation == generation and image.in_flight == count:
                return
        threading.Event().wait(0.001)
    raise AssertionError(f"no call in flight on generation {generation}: {reg.status()}")


@pytest.mark.timeout(60)
def test_call_in_flight_finishes_on_old_image_while_new_calls_get_new(reg, loaded, moddir, samples):
    f = reg.func("sample.version")
    blocked = BlockedCall(loaded.wait_fd)
    wait_until_in_flight(reg, 1)
    install(samples["v2"], moddir / "sample.so")
    assert reg.reload("sample") is loaded
    assert loaded.generation == 2
    assert f() == 2 and loaded.scaled(10) == 20
    [status] = reg.status()
    states = [(i.generation, i.state, i.in_flight) for i in status.images]
    assert states == [(1, "retired", 1), (2, "active", 0)]
    old_copy = status.images[0].copy_path
    assert old_copy in mapped_paths()
    assert reg.wait_drained(timeout=0.05) is False
    assert blocked.release() == 1          # finished on the image it started on
    assert reg.wait_drained(timeout=5) is True
    assert [(i.generation, i.state) for i in reg.status()[0].images] == [(2, "active")]
    assert old_copy not in mapped_paths()
    assert not os.path.exists(old_copy)


def test_idle_old_image_closes_at_reload(reg, loaded, moddir, samples):
    old_copy = reg.status()[0].images[0].copy_path
    install(samples["v2"], moddir / "sample.so")
    reg.reload("sample")
    assert [(i.generation, i.state) for i in reg.status()[0].images] == [(2, "active")]
    assert old_copy not in mapped_paths()
    assert reg.wait_drained(timeout=0) is True


def test_reload_always_loads_a_fresh_copy_with_fresh_static_state(reg, loaded):
    assert [loaded.counter_next() for _ in range(3)] == [1, 2, 3]
    first = reg.status()[0].images[0].copy_path
    reg.reload("sample")                       # the file did not change
    second = reg.status()[0].images[0].copy_path
    assert first != second
    assert loaded.generation == 2
    assert loaded.counter_next() == 1


def test_copies_are_private_not_links(reg, loaded, moddir, tmpdir_for_copies):
    copy = reg.status()[0].images[0].copy_path
    directory = os.path.dirname(copy)
    assert os.path.dirname(directory) == str(tmpdir_for_copies)
    assert os.path.basename(directory).startswith(f"nativereload-{os.getpid()}-")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert not os.path.islink(copy)
    source = os.stat(moddir / "sample.so")
    assert (os.stat(copy).st_dev, os.stat(copy).st_ino) != (source.st_dev, source.st_ino)
    assert source.st_nlink == 1
    assert copy in mapped_paths()
    assert str(moddir / "sample.so") not in mapped_paths()


def test_tmpdir_is_read_at_each_load(moddir, tmp_path, samples, monkeypatch):
    install(samples["v1"], moddir / "sample.so")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("TMPDIR", str(first))
    with Registry(path=[moddir]) as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
        assert reg.status()[0].images[0].copy_path.startswith(str(first) + os.sep)
        monkeypatch.setenv("TMPDIR", str(second))
        reg.reload("sample")
        assert reg.status()[0].images[0].copy_path.startswith(str(second) + os.sep)
    assert os.listdir(first) == [] and os.listdir(second) == []


def test_func_taken_before_reload_calls_new_image(reg, loaded, moddir, samples):
    scaled = loaded.scaled
    assert scaled(5) == 5
    install(samples["v3"], moddir / "sample.so")
    reg.reload("sample")
    assert scaled(5) == 15
    assert reg.call("sample.scaled", 2) == 6


def test_exceptions_through_a_call_still_count_the_exit(reg, loaded):
    with pytest.raises(TypeError):
        loaded.add("not", "numbers")
    with pytest.raises(TypeError):
        loaded.add(1)
    assert reg.status()[0].images[0].in_flight == 0
    reg.reload("sample")
    assert reg.wait_drained(timeout=0) is True


# -- transactional failures: the old image keeps serving, nothing is left behind ---------------------

def _assert_unchanged(reg, loaded, tmpdir_for_copies, copies_before, fds_before):
    assert loaded.generation == 1
    assert loaded.version() == 1
    assert reg.call("sample.scaled", 7) == 7
    [status] = reg.status()
    assert [(i.generation, i.state) for i in status.images] == [(1, "active")]
    assert private_copies(tmpdir_for_copies) == copies_before
    assert open_fds() == fds_before
    assert sum(1 for path in mapped_paths() if path.startswith(str(tmpdir_for_copies))) == 1


def _truncate(path, samples, size):
    data = samples["v2"].read_bytes()[:size]
    partial = path.with_name("partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _wrong_machine(path, samples):
    data = bytearray(samples["v2"].read_bytes())
    data[18:20] = (183).to_bytes(2, "little")      # e_machine = AArch64
    partial = path.with_name("partial")
    partial.write_bytes(bytes(data))
    os.replace(partial, path)


FAILURES = {
    "missing symbol": (lambda p, s: install(s["nosym"], p), SymbolError, "'scaled' not found"),
    "undefined external": (lambda p, s: install(s["undef"], p), LoadError,
                           "undefined symbol: nativereload_sample_missing_function"),
    "not ELF": (lambda p, s: p.write_text("#!/bin/sh\necho not a library\n"), LoadError, "not an ELF file"),
    "empty": (lambda p, s: p.write_bytes(b""), LoadError, "empty file"),
    "truncated in segments": (lambda p, s: _truncate(p, s, 9000), LoadError, "truncated"),
    "truncated header": (lambda p, s: _truncate(p, s, 40), LoadError, "truncated"),
    "truncated before section table": (lambda p, s: _truncate(p, s, s["v2"].stat().st_size - 10), LoadError,
                                       "section-header table"),
    "wrong architecture": (_wrong_machine, LoadError, "AArch64"),
    "file deleted": (lambda p, s: p.unlink(), ModuleNotFound, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_reload_leaves_old_version_serving(reg, loaded, moddir, samples, tmpdir_for_copies, case):
    break_file, error, text = FAILURES[case]
    copies_before, fds_before = private_copies(tmpdir_for_copies), open_fds()
    break_file(moddir / "sample.so", samples)
    with pytest.raises(error, match=text) as info:
        reg.reload("sample")
    message = str(info.value)
    assert "'sample'" in message
    assert "reload refused; generation 1 still serving" in message
    assert info.value.module == "sample"
    _assert_unchanged(reg, loaded, tmpdir_for_copies, copies_before, fds_before)
    # ... and the next good build reloads fine.
    install(samples["v2"], moddir / "sample.so")
    reg.reload("sample")
    assert loaded.version() == 2


def test_bad_cdef_on_reload_leaves_old_version_serving(reg, loaded, tmpdir_for_copies):
    copies_before, fds_before = private_copies(tmpdir_for_copies), open_fds()
    with pytest.raises(InterfaceError, match="'sample'"):
        reg.reload("sample", cdef="long add(long,,);")
    _assert_unchanged(reg, loaded, tmpdir_for_copies, copies_before, fds_before)


def test_load_errors_carry_the_loaders_text(reg, moddir, samples):
    install(samples["undef"], moddir / "sample.so")
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert "undefined symbol: nativereload_sample_missing_function" in info.value.reason
    assert info.value.path == str(moddir / "sample.so")
    assert "load refused" in str(info.value)
    assert reg.status() == []


def test_reload_with_new_cdef(reg, loaded, moddir, samples):
    install(samples["nosym"], moddir / "sample.so")
    scaled = loaded.scaled
    new_cdef = SAMPLE_CDEF.replace("long scaled(long);", "")
    with pytest.raises(InterfaceError, match=r"removed function scaled\n +old: long scaled\(long\)"):
        reg.reload("sample", cdef=new_cdef)       # dropping a declared function is refused ...
    assert loaded.generation == 1 and loaded.scaled(2) == 2
    reg.reload("sample", cdef=new_cdef, allow_interface_change=True)   # ... unless asked for on purpose
    assert loaded.generation == 2 and loaded.cdef == new_cdef
    assert loaded.version() == 2
    with pytest.raises(SymbolError, match="'scaled'"):
        scaled(3)
    with pytest.raises(SymbolError):
        reg.func("sample.scaled")
    # The new declarations also serve new symbols.
    install(samples["v3"], moddir / "sample.so")
    reg.reload("sample", cdef=SAMPLE_CDEF)        # adding a function back is an addition: accepted
    assert scaled(3) == 9 and loaded.interface_change.summary() == "1 added (compatible)"


def test_reload_of_unloaded_module_is_refused(reg, loaded):
    reg.unload("sample")
    with pytest.raises(Exception, match="not loaded"):
        reg.reload("sample")


@pytest.mark.timeout(60)
def test_unload_with_call_in_flight(reg, loaded):
    blocked = BlockedCall(loaded.wait_fd)
    wait_until_in_flight(reg, 1)
    reg.unload("sample")
    [status] = reg.status()                   # still listed while draining, no active image
    assert status.name == "sample"
    assert [(i.state, i.in_flight) for i in status.images] == [("retired", 1)]
    with pytest.raises(ModuleUnloaded):
        loaded.version()
    assert blocked.release() == 1
    assert reg.wait_drained(timeout=5)
    assert reg.status() == []


@pytest.mark.timeout(60)
def test_close_with_a_busy_image_finishes_when_the_call_returns(moddir, samples, tmpdir_for_copies, gate_impl):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    blocked = BlockedCall(mod.wait_fd)
    wait_until_in_flight(reg, 1)
    assert reg.close(timeout=0.05) is False
    assert len(os.listdir(tmpdir_for_copies)) == 1         # the busy image's directory is still there
    assert blocked.release() == 1
    assert reg.wait_drained(timeout=5)
    assert os.listdir(tmpdir_for_copies) == []


LEAK_SCENARIO = """
import json, logging, os, sys
import nativereload
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append((record.levelname, record.getMessage()))
logging.getLogger("nativereload").addHandler(handler)
logging.getLogger("nativereload").setLevel(logging.INFO)
reg = nativereload.Registry(path=[sys.argv[1]], tmpdir=sys.argv[2])
mod = reg.load("unique", cdef="int unique_next(void);")
first = mod.unique_next()
reg.reload("unique")
status = reg.status()[0]
leaked_copy = status.images[0].copy_path
maps = open("/proc/self/maps").read()
print(json.dumps({
    "images": [[i.generation, i.state, i.in_flight] for i in status.images],
    "copy_exists": os.path.exists(leaked_copy), "copy_mapped": leaked_copy in maps,
    "drained": reg.wait_drained(timeout=0), "first": first, "second": mod.unique_next(),
    "warnings": [m for level, m in records if level == "WARNING"],
}))
"""


def test_leaked_image_is_reported_and_its_copy_kept(moddir, samples, tmpdir_for_copies, gate_impl):
    # In a fresh process: once one image of a library with unique symbols is
    # leaked, later copies bind to it and are themselves unloadable.
    install(samples["unique"], moddir / "unique.so")
    code = LEAK_SCENARIO.replace("sys.argv[1]", repr(str(moddir))).replace("sys.argv[2]", repr(str(tmpdir_for_copies)))
    result = run_python(code, env={"NATIVERELOAD_PURE_PYTHON": os.environ.get("NATIVERELOAD_PURE_PYTHON", "")})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == [[1, "leaked", 0], [2, "active", 0]]
    assert report["copy_exists"] and report["copy_mapped"]
    assert report["drained"] is True                        # leaked counts as closed
    # The warning gives the reason the file shows, not a list of guesses.
    [warning] = [w for w in report["warnings"] if "leaked" in w]
    assert "STB_GNU_UNIQUE symbols" in warning and "-fno-gnu-unique" in warning
    assert "thread_local" not in warning and "another reference" not in warning
    # glibc binds a unique symbol to its first definition: the new image shares the old one's counter.
    assert (report["first"], report["second"]) == (1, 2)
    assert private_copies(tmpdir_for_copies) == []          # the process removed everything as it exited


def test_old_image_does_not_capture_new_images_symbols(reg, loaded):
    import ctypes

    # RTLD_LOCAL: nothing the module defines is visible to global symbol lookup.
    with pytest.raises(AttributeError):
        ctypes.CDLL(None).scaled
