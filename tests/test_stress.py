"""Many threads calling while reloads run; many reload cycles leaving nothing behind."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from conftest import SAMPLE_CDEF, install, mapped_paths, open_fds, private_copies


@pytest.fixture
def fast_switching():
    # Make the interpreter switch threads as often as it can, so a switch lands
    # between reading the current image and counting the call into it.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


# The free-threaded CI (.ci/freethreaded.sh) runs this at 8 callers and 2,000 reloads.
CALLERS = int(os.environ.get("NATIVERELOAD_STRESS_CALLERS", "4"))
RELOADS = int(os.environ.get("NATIVERELOAD_STRESS_RELOADS", "200"))


@pytest.mark.timeout(120 + RELOADS // 10)
def test_threads_calling_through_200_reloads(reg, moddir, samples, tmpdir_for_copies, fast_switching):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    version, scaled = reg.func("sample.version"), mod.scaled
    stop = threading.Event()
    errors, results, calls = [], set(), [0] * CALLERS

    def caller(index):
        local = set()
        try:
            while not stop.is_set():
                # One image serves each call: version() and scaled() may come from different images.
                local.add(("version", version()))
                local.add(("scaled", scaled(10)))
                local.add(("add", reg.call("sample.add", 2, 3)))
                calls[index] += 3
        except BaseException as exc:      # noqa: BLE001 - any error at all fails the test
            errors.append(exc)
        results.update(local)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(RELOADS):
            install(samples["v2" if cycle % 2 == 0 else "v1"], moddir / "sample.so")
            reg.reload("sample")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert all(count > 0 for count in calls)
    assert results <= {("version", 1), ("version", 2), ("scaled", 10), ("scaled", 20), ("add", 5)}
    assert {("version", 1), ("version", 2)} <= results
    assert mod.generation == RELOADS + 1
    assert reg.wait_drained(timeout=10)
    [status] = reg.status()
    assert [(i.generation, i.state, i.in_flight) for i in status.images] == [(RELOADS + 1, "active", 0)]
    assert private_copies(tmpdir_for_copies) == [status.images[0].copy_path]


@pytest.mark.timeout(180)
def test_1000_reload_cycles_leave_one_mapping_and_no_growth(reg, moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    reg.reload("sample")
    ffi = mod.ffi
    fds, libraries = open_fds(), len(ffi._libraries)
    for cycle in range(1000):
        install(samples["v2" if cycle % 2 == 0 else "v1"], moddir / "sample.so")
        reg.reload("sample")
        assert mod.scaled(1) in (1, 2)
    assert mod.generation == 1002
    assert open_fds() == fds
    # cffi's per-FFI library lists (which ffi.dlopen grows by ~6 KB a call) stay as they were.
    assert len(ffi._libraries) == libraries
    assert len(ffi._function_caches) <= libraries
    ours = [path for path in mapped_paths() if path.startswith(str(tmpdir_for_copies))]
    [active] = reg.status()[0].images
    assert ours == [active.copy_path]
    assert private_copies(tmpdir_for_copies) == [active.copy_path]
