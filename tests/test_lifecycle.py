"""Lifecycle: init/fini hooks with state handed over, the order of events, exclusive reloads, the crash
canary, rollback, and on_reload callbacks.

The lifecycle sample (csrc/samples/lifecycle.c) appends a line per init and
fini to the file named by LIFECYCLE_EVENTS, so the tests read the exact order.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import subprocess
import threading
import time

import pytest

from nativereload import (CanaryFailed, DrainTimeout, InitRefused, LoadError, ModuleNameError, NativeReloadError,
                          Registry, lifecycle)

from conftest import LIFECYCLE_CDEF, ROOT, install, mapped_paths, open_fds, private_copies

from test_reload import BlockedCall, wait_until_in_flight


@pytest.fixture
def events_file(tmp_path, monkeypatch):
    path = tmp_path / "events.txt"
    monkeypatch.setenv("LIFECYCLE_EVENTS", str(path))
    monkeypatch.delenv("LIFECYCLE_REFUSE", raising=False)
    return path


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def module(reg, moddir, samples, events_file):
    install(samples["lifecycle1"], moddir / "lifecycle.so")
    return reg.load("lifecycle", cdef=LIFECYCLE_CDEF)


def to(reg, moddir, samples, version, **options):
    install(samples[f"lifecycle{version}"], moddir / "lifecycle.so")
    return reg.reload("lifecycle", **options)


def test_the_state_carries_over_100_reloads(reg, module):
    assert [module.lifecycle_next() for _ in range(3)] == [1, 2, 3]
    for n in range(100):
        reg.reload("lifecycle")
        assert module.lifecycle_next() == 4 + n        # continues instead of restarting at 1
    assert module.generation == 101
    assert reg.wait_drained(timeout=5)


def test_state_version_migration_and_the_order_of_events(reg, module, moddir, samples, events_file):
    module.lifecycle_next()
    module.lifecycle_next()
    to(reg, moddir, samples, 2)                           # v1's layout -> v2's: migrated
    assert module.lifecycle_next() == 3 and module.lifecycle_reloads() == 1
    reg.reload("lifecycle")                               # v2 -> v2: adopted
    assert module.lifecycle_next() == 4 and module.lifecycle_reloads() == 2
    reg.unload("lifecycle")
    assert reg.wait_drained(timeout=5)
    assert lines(events_file) == [
        "init 1 prev=0 state=new",
        "init 2 prev=1 state=migrated",      # new init sees the old state, before the switch
        "fini 1 adopted=0 reason=1",         # the old one drains: its state was not adopted, it frees it
        "init 3 prev=2 state=adopted",
        "fini 2 adopted=1 reason=1",         # adopted: it must not free the state its successor uses
        "fini 3 adopted=0 reason=2",         # unloaded: the last holder frees it
    ]


def test_the_old_image_finishes_only_after_its_last_call(reg, module, moddir, samples, events_file):
    blocked = BlockedCall(module.lifecycle_wait_fd)
    wait_until_in_flight(reg, 1)
    to(reg, moddir, samples, 2)
    assert lines(events_file)[-1] == "init 2 prev=1 state=migrated"
    assert module.lifecycle_version() == 2                # switched while the old call runs on
    assert blocked.release() == 1
    assert reg.wait_drained(timeout=5)
    assert lines(events_file)[-1] == "fini 1 adopted=0 reason=1"


def test_init_refusing_leaves_the_old_version_serving(reg, module, moddir, samples, events_file,
                                                      tmpdir_for_copies, monkeypatch):
    module.lifecycle_next()
    copies, fds, maps = private_copies(tmpdir_for_copies), open_fds(), mapped_paths()
    monkeypatch.setenv("LIFECYCLE_REFUSE", "2")
    install(samples["lifecycle2"], moddir / "lifecycle.so")
    with pytest.raises(InitRefused, match=r"nativereload_init\(\) of generation 2 refused \(returned 7\): "
                                          r"LIFECYCLE_REFUSE=2: version 2 will not start \(reload refused; "
                                          r"generation 1 still serving\)") as raised:
        reg.reload("lifecycle")
    assert raised.value.code == 7 and raised.value.generation == 2
    assert module.generation == 1 and module.lifecycle_version() == 1 and module.lifecycle_next() == 2
    assert private_copies(tmpdir_for_copies) == copies and open_fds() == fds and mapped_paths() == maps
    assert lines(events_file) == ["init 1 prev=0 state=new", "refused 2"]      # closed without fini
    monkeypatch.delenv("LIFECYCLE_REFUSE")
    reg.reload("lifecycle")
    assert module.lifecycle_next() == 3


def test_init_refusing_a_first_load(reg, moddir, samples, events_file, monkeypatch, tmpdir_for_copies):
    monkeypatch.setenv("LIFECYCLE_REFUSE", "1")
    install(samples["lifecycle1"], moddir / "lifecycle.so")
    with pytest.raises(InitRefused, match="load refused"):
        reg.load("lifecycle", cdef=LIFECYCLE_CDEF)
    assert reg.status() == [] and private_copies(tmpdir_for_copies) == []


def test_fini_runs_once_per_image_at_close(moddir, samples, events_file, tmpdir_for_copies):
    install(samples["lifecycle1"], moddir / "lifecycle.so")
    registry = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    mod = registry.load("lifecycle", cdef=LIFECYCLE_CDEF)
    blocked = BlockedCall(mod.lifecycle_wait_fd)
    wait_until_in_flight(registry, 1)
    registry.reload("lifecycle")
    assert registry.close(timeout=0.1) is False                 # generation 1 still has its call
    assert lines(events_file) == ["init 1 prev=0 state=new", "init 2 prev=1 state=adopted",
                                  "fini 2 adopted=1 reason=2"]
    blocked.release()
    for _ in range(500):
        if len(lines(events_file)) == 4:
            break
        time.sleep(0.01)
    assert lines(events_file)[-1] == "fini 1 adopted=0 reason=1"
    assert private_copies(tmpdir_for_copies) == []


def test_an_aborted_prepare_finishes_its_image_without_freeing_a_shared_state(reg, module, events_file):
    staged = reg.prepare("lifecycle")
    staged.abort()
    assert lines(events_file) == ["init 1 prev=0 state=new", "init 2 prev=1 state=adopted",
                                  "fini 2 adopted=1 reason=3"]
    assert module.lifecycle_next() == 1                          # the state is intact


@pytest.mark.timeout(120)
def test_an_exclusive_reload_never_runs_calls_in_two_images(reg, module, moddir, samples):
    stop, errors, calls = threading.Event(), [], [0] * 4

    def caller(index):
        try:
            while not stop.is_set():
                assert module.lifecycle_work(200) in (1, 2)
                calls[index] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(20):
            to(reg, moddir, samples, 1 + (n + 1) % 2, exclusive=True, timeout=10)
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == [] and all(calls)
    assert module.lifecycle_violations() == 0


@pytest.mark.timeout(60)
def test_an_exclusive_reload_times_out_and_the_waiting_calls_go_on(reg, module, moddir, samples, events_file):
    blocked = BlockedCall(module.lifecycle_wait_fd)
    wait_until_in_flight(reg, 1)
    install(samples["lifecycle2"], moddir / "lifecycle.so")
    waited = []

    def late_call():
        time.sleep(0.1)                                   # arrives while the reload waits: it waits too
        waited.append(module.lifecycle_version())

    late = threading.Thread(target=late_call)
    late.start()
    events = []
    reg.on_reload(lambda event: events.append((event.kind, event.seconds)))
    cpu = time.thread_time()
    with pytest.raises(DrainTimeout, match=r"waited 0.5 s and generation 1 still has 1 call"):
        reg.reload("lifecycle", exclusive=True, timeout=0.5)
    # It waited on the gate's quiet event, not in a loop: a spin would burn about 0.5 s of this thread's CPU.
    assert time.thread_time() - cpu < 0.3
    late.join(10)
    assert reg._events.flush(timeout=30)                 # callbacks run on their own thread
    assert [kind for kind, _ in events] == ["prepared", "aborted", "refused"]
    assert all(0 <= seconds < 60 for _, seconds in events)
    assert waited == [1]                                  # refused: it went on to the old image
    assert module.generation == 1 and [i.state for i in reg.status()[0].images] == ["active"]
    assert "init 2" not in "\n".join(lines(events_file))  # init never ran
    assert blocked.release() == 1


@pytest.mark.timeout(60)
def test_an_exclusive_reload_waits_until_its_timeout_ends(reg, module, moddir, samples, events_file):
    # The call leaves well inside the timeout (1 s): the reload must wait for it, not give up early.
    blocked = BlockedCall(module.lifecycle_wait_fd)
    wait_until_in_flight(reg, 1)
    install(samples["lifecycle2"], moddir / "lifecycle.so")
    results = []
    releaser = threading.Timer(0.05, lambda: results.append(blocked.release()))
    releaser.start()
    reg.reload("lifecycle", exclusive=True, timeout=1.0)
    releaser.join(10)
    assert results == [1] and module.generation == 2 and module.lifecycle_version() == 2


@pytest.mark.parametrize("variant, expected", [
    ("lifecycle_crash", r"killed by SIGSEGV"),
    ("lifecycle_selftest3", r"nativereload_selftest\(\) of .* returned 3"),
    ("lifecycle_hang", r"did not finish within 3 s"),
])
@pytest.mark.timeout(120)
def test_the_canary_refuses_a_bad_build_the_serving_process_never_loads(reg, module, moddir, samples, variant,
                                                                         expected):
    maps = mapped_paths()
    install(samples[variant], moddir / "lifecycle.so")
    with pytest.raises(CanaryFailed, match=expected) as raised:
        reg.reload("lifecycle", canary=True, canary_timeout=3)
    assert "the serving process never loaded it" in str(raised.value)
    if variant == "lifecycle_crash":
        assert raised.value.signal == "SIGSEGV"
    elif variant == "lifecycle_selftest3":
        assert raised.value.selftest == 3
    else:
        assert raised.value.timed_out
    assert module.generation == 1 and mapped_paths() == maps


@pytest.mark.timeout(120)
def test_the_canary_passes_a_good_build_and_runs_a_callable(reg, module, moddir, samples, caplog):
    with caplog.at_level(logging.INFO, logger="nativereload"):
        to(reg, moddir, samples, 2, canary=True)
    assert module.lifecycle_version() == 2
    [canary] = [float(found.group(1)) for found in (re.fullmatch(
        r"canary of 'lifecycle' generation 2 passed in (\d+) ms", m) for m in caplog.messages) if found]
    [reload] = [float(found.group(1)) for found in (re.fullmatch(
        r"reloaded 'lifecycle' generation 2 in ([\d.]+) ms.*", m) for m in caplog.messages) if found]
    assert 0 <= canary <= reload + 1                      # the canary's time is part of the reload's
    install(samples["lifecycle1"], moddir / "lifecycle.so")
    with pytest.raises(CanaryFailed, match="AssertionError: canary says no"):
        reg.reload("lifecycle", canary="canary_checks:refuse")
    to(reg, moddir, samples, 1, canary="canary_checks:accept")
    assert module.lifecycle_version() == 1


def test_rollback_brings_the_previous_build_back(reg, module, moddir, samples, events_file):
    module.lifecycle_next()
    to(reg, moddir, samples, 2)                           # the bad-but-loadable version
    assert [kept[0] for kept in reg.status()[0].kept] == [1]
    reg.rollback("lifecycle")
    assert module.generation == 3 and module.lifecycle_version() == 1
    assert module.lifecycle_next() == 2                   # the state came along (migrated back to v1)
    assert os.path.realpath(module.path) == os.path.realpath(moddir / "lifecycle.so")   # the path stays
    assert [kept[0] for kept in reg.status()[0].kept] == [2]


def test_rollback_checks_the_name_logs_and_takes_reloads_defaults(reg, module, moddir, samples, caplog):
    to(reg, moddir, samples, 2)
    with pytest.raises(ModuleNameError, match="invalid module name"):
        reg.rollback("../lifecycle")
    with caplog.at_level(logging.INFO, logger="nativereload"):
        reg.rollback("lifecycle")
    assert "rolled back 'lifecycle' to the build of generation 1, now generation 3" in caplog.messages
    # "with the same checks, hooks and options as reload": no canary, not exclusive, no interface change.
    rollback = inspect.signature(Registry.rollback).parameters
    reload = inspect.signature(Registry.reload).parameters
    for option, default in (("allow_interface_change", False), ("canary", False), ("canary_timeout", None),
                            ("exclusive", False), ("timeout", None)):
        assert rollback[option].default is reload[option].default is default, option


@pytest.mark.timeout(60)
def test_an_exclusive_reload_whose_init_refuses_leaves_the_old_image_serving(reg, module, moddir, samples,
                                                                           tmpdir_for_copies, monkeypatch):
    events = []
    reg.on_reload(events.append)
    monkeypatch.setenv("LIFECYCLE_REFUSE", "2")
    with pytest.raises(InitRefused) as refusal:
        to(reg, moddir, samples, 2, exclusive=True)      # its init runs at commit, with the old image paused
    monkeypatch.delenv("LIFECYCLE_REFUSE")
    assert reg._events.flush(timeout=30)                 # callbacks run on their own thread
    assert [event.kind for event in events] == ["prepared", "aborted", "refused"]
    refused = events[-1]
    assert refused.error is refusal.value and (refused.generation, refused.previous_generation) == (2, 1)
    assert 0 < refused.seconds < 60                      # from prepare to the refusal: a duration, not a clock
    assert module.generation == 1 and module.lifecycle_version() == 1     # unpaused: calls run again
    assert [image.generation for image in reg.status()[0].images] == [1]
    assert len(private_copies(tmpdir_for_copies)) == 1                    # the refused copy is gone


def test_a_kept_build_that_cannot_be_written_refuses_the_rollback(reg, module, moddir, samples, tmpdir_for_copies,
                                                                  monkeypatch):
    to(reg, moddir, samples, 2)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
        with pytest.raises(LoadError, match=r"cannot write the kept build of generation 1: No space left on device"):
            reg.rollback("lifecycle")
    assert module.generation == 2 and module.lifecycle_version() == 2
    assert not [path for path in private_copies(tmpdir_for_copies) if ".kept-" in path]   # removed, not left


def test_unload_drops_the_kept_builds(reg, module, moddir, samples):
    to(reg, moddir, samples, 2)
    history = module._history
    assert [kept.generation for kept in history.kept] == [1]
    reg.unload("lifecycle")
    assert history.kept == []                   # the bytes go with the module, not when its images close


def test_rollback_with_no_history(moddir, samples, tmpdir_for_copies, events_file):
    install(samples["lifecycle1"], moddir / "lifecycle.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, history=0) as registry:
        registry.load("lifecycle", cdef=LIFECYCLE_CDEF)
        registry.reload("lifecycle")
        assert registry.status()[0].kept == []
        with pytest.raises(NativeReloadError, match=r"no kept version.*history=0"):
            registry.rollback("lifecycle")
    assert private_copies(tmpdir_for_copies) == []


def test_rollback_to_a_named_generation_with_history_3(moddir, samples, tmpdir_for_copies, events_file):
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, history=3) as registry:
        install(samples["lifecycle1"], moddir / "lifecycle.so")
        mod = registry.load("lifecycle", cdef=LIFECYCLE_CDEF)
        for version in (2, 1, 2, 2):                      # generations 2..5
            to(registry, moddir, samples, version)
        status = registry.status()[0]
        assert [kept[0] for kept in status.kept] == [2, 3, 4]
        sha = dict(status.kept)
        assert sha[2] == sha[4] != sha[3]                 # the same build, the same bytes
        with pytest.raises(NativeReloadError, match="kept: 2, 3, 4"):
            registry.rollback("lifecycle", generation=1)
        registry.rollback("lifecycle", generation=3)
        assert mod.generation == 6 and mod.lifecycle_version() == 1
        assert registry.status()[0].images[-1].sha256 == sha[3]
    assert private_copies(tmpdir_for_copies) == []        # kept files go with the registry's directory


def test_on_reload_sees_every_event_in_order(reg, module, moddir, samples, monkeypatch):
    seen = []
    durations = []

    def record(event):
        seen.append((event.kind, event.module, event.generation, event.previous_generation))
        durations.append((event.kind, event.seconds))

    def broken(event):
        raise RuntimeError("a broken callback")

    remove_broken = reg.on_reload(broken)
    reg.on_reload(record)
    reg.reload("lifecycle")
    staged = reg.prepare("lifecycle")
    staged.abort()
    monkeypatch.setenv("LIFECYCLE_REFUSE", "1")
    with pytest.raises(InitRefused):
        reg.reload("lifecycle")
    monkeypatch.delenv("LIFECYCLE_REFUSE")
    remove_broken()
    reg.unload("lifecycle")
    assert reg.wait_drained(timeout=5)
    for _ in range(500):
        if len(seen) >= 8:
            break
        time.sleep(0.01)
    assert seen == [
        ("prepared", "lifecycle", 2, 1), ("committed", "lifecycle", 2, 1), ("drained", "lifecycle", 1, 1),
        ("prepared", "lifecycle", 3, 2), ("aborted", "lifecycle", 3, 2),
        ("refused", "lifecycle", 3, 2),
        ("unloaded", "lifecycle", 2, 2), ("drained", "lifecycle", 2, 2),
    ]
    # How long each took, in seconds (a bound that catches a wrong unit or sign, not a timing test).
    assert all(seconds == 0 if kind == "drained" else 0 <= seconds < 60 for kind, seconds in durations), durations


def test_the_context_layout_matches_the_header(tmp_path):
    """lifecycle.CONTEXT_CDEF is the header's struct, as the C compiler lays it out."""
    fields = ["size", "module", "generation", "previous_generation", "state", "state_version", "adopted",
              "reason", "error"]
    source = tmp_path / "layout.c"
    source.write_text('#include <stdio.h>\n#include <stddef.h>\n#include <nativereload.h>\nint main(void) {\n'
                      '    printf("%zu", sizeof(nativereload_context));\n'
                      + "".join(f'    printf(" %zu", offsetof(nativereload_context, {f}));\n' for f in fields)
                      + "    return 0;\n}\n")
    subprocess.run(["cc", "-I", str(ROOT / "nativereload" / "include"), str(source), "-o", str(tmp_path / "l")],
                   check=True)
    printed = [int(x) for x in subprocess.run([str(tmp_path / "l")], capture_output=True, text=True,
                                              check=True).stdout.split()]
    ffi = lifecycle._ffi
    assert printed == [ffi.sizeof("nativereload_context")] + [ffi.offsetof("nativereload_context", f)
                                                             for f in fields]
    # The canary's ctypes copy of it, too.
    import ctypes

    from nativereload.canary_child import Context

    assert printed == [ctypes.sizeof(Context)] + [getattr(Context, f).offset for f in fields]


@pytest.mark.timeout(120)
def test_rollback_and_canary_over_the_socket(reg, module, moddir, samples):
    from nativereload import ProtocolError
    from nativereload.control import protocol, server

    install(samples["lifecycle2"], moddir / "lifecycle.so")
    reply = server.handle(reg, {"op": "reload", "module": "lifecycle", "canary": True})
    assert reply["ok"] and reply["generation"] == 2 and module.lifecycle_version() == 2
    reply = server.handle(reg, {"op": "rollback", "module": "lifecycle"})
    assert reply["ok"] and reply["generation"] == 3 and module.lifecycle_version() == 1
    with pytest.raises(NativeReloadError, match="no kept version of generation 1"):
        server.handle(reg, {"op": "rollback", "module": "lifecycle", "generation": 1})
    for bad in ({"op": "rollback", "module": "lifecycle", "generation": "2"},
                {"op": "reload", "module": "lifecycle", "canary": "yes"},
                {"op": "rollback", "module": "lifecycle", "generation": True}):
        with pytest.raises(ProtocolError):
            protocol.check_request(bad)
