"""The Registry's public API: finding, loading, calling, unloading, status, errors."""

from __future__ import annotations

import inspect
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import nativereload
from nativereload import (InterfaceError, ModuleConflict, ModuleNameError, ModuleNotFound, ModuleNotLoaded,
                          ModuleUnloaded, NativeReloadError, Registry, SymbolError)

from conftest import SAMPLE_CDEF, install, private_copies


def test_load_and_call_every_way(reg, moddir, samples):
    source = install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    assert (mod.name, mod.path, mod.generation) == ("sample", str(source), 1)
    assert mod.add(2, 3) == 5
    f = reg.func("sample.add")
    assert f(2, 3) == 5
    assert reg.call("sample.add", 40, 2) == 42
    assert isinstance(f, nativereload.Func)
    assert f.name == "sample.add"
    assert reg.func("sample.add") is f is mod.add
    assert mod.dot4(1.0, 1.0, 1.0, 1.0) == 10.0
    assert mod.sum_bytes(b"\x01\x02\x03", 3) == 6
    assert mod.ffi.string(mod.version_string()) == b"sample v1"


def test_load_of_loaded_module_returns_it_unchanged(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    assert reg.load("sample", cdef=SAMPLE_CDEF) is mod
    assert reg.load("sample", cdef=SAMPLE_CDEF, file=moddir / "sample.so") is mod
    assert reg.load("sample") is mod                 # like require: no need to repeat the cdef
    assert mod.generation == 1
    assert len(reg.status()[0].images) == 1


def test_load_with_other_cdef_or_file_points_to_reload(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    other = install(samples["v2"], moddir / "other.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    with pytest.raises(ModuleConflict, match=r"reload\('sample', cdef=\.\.\.\)"):
        reg.load("sample", cdef="int version(void);")
    with pytest.raises(ModuleConflict, match="other.so"):
        reg.load("sample", cdef=SAMPLE_CDEF, file=other)
    with pytest.raises(ModuleConflict, match="different file"):
        reg.load("sample", file=other)
    assert reg.call("sample.version") == 1


def test_cdef_is_required_and_must_parse(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    with pytest.raises(InterfaceError, match="it embeds none and no cdef was given.*INTERFACE.*cdef="):
        reg.load("sample")
    with pytest.raises(InterfaceError, match="'sample'.*does not parse"):
        reg.load("sample", cdef="long add(long,;")
    assert reg.status() == []


def test_name_resolution_order(reg, moddir, tmp_path, samples, monkeypatch):
    second = tmp_path / "second"
    install(samples["v2"], moddir / "libsample.so")
    install(samples["v1"], second / "sample.so")
    reg._path.append(str(second))
    # libNAME.so in the first directory wins over NAME.so in a later one: directory by directory.
    assert reg.find("sample") == str(moddir / "libsample.so")
    install(samples["v1"], moddir / "sample.so")
    assert reg.find("sample") == str(moddir / "sample.so")
    # Dotted names are subdirectories.
    install(samples["v3"], moddir / "pkg" / "libsub.so")
    mod = reg.load("pkg.sub", cdef=SAMPLE_CDEF)
    assert mod.path == str(moddir / "pkg" / "libsub.so")
    assert reg.call("pkg.sub.version") == 3          # split at the last dot
    # NATIVERELOAD_PATH is searched after path.
    env_dir = tmp_path / "envdir"
    install(samples["v2"], env_dir / "fromenv.so")
    monkeypatch.setenv("NATIVERELOAD_PATH", os.pathsep.join(["/nonexistent", str(env_dir)]))
    assert reg.search_path()[-2:] == ["/nonexistent", str(env_dir)]
    assert reg.load("fromenv", cdef=SAMPLE_CDEF).version() == 2


def test_not_found_lists_every_path(reg, moddir, tmp_path, monkeypatch):
    monkeypatch.setenv("NATIVERELOAD_PATH", str(tmp_path / "env"))
    with pytest.raises(ModuleNotFound) as info:
        reg.load("pkg.missing", cdef=SAMPLE_CDEF)
    expected = [str(moddir / "pkg" / "missing.so"), str(moddir / "pkg" / "libmissing.so"),
                str(tmp_path / "env" / "pkg" / "missing.so"), str(tmp_path / "env" / "pkg" / "libmissing.so")]
    assert list(info.value.searched) == expected
    for path in expected:
        assert path in str(info.value)
    assert info.value.module == "pkg.missing"


def test_explicit_file(reg, tmp_path, samples):
    source = install(samples["v2"], tmp_path / "elsewhere" / "anything.so")
    mod = reg.load("custom", cdef=SAMPLE_CDEF, file=source)
    assert mod.path == str(source)
    assert mod.version() == 2
    with pytest.raises(ModuleNotFound, match="missing.so"):
        reg.load("gone", cdef=SAMPLE_CDEF, file=tmp_path / "missing.so")


@pytest.mark.parametrize("name", ["a/b", "../sample", "a..b", ".sample", "sample.", "", "pkg..sub", "x/../y"])
def test_bad_names_are_refused(reg, name):
    with pytest.raises(ModuleNameError, match="invalid module name"):
        reg.load(name, cdef=SAMPLE_CDEF)
    with pytest.raises(NativeReloadError):
        reg.reload(name)


def test_never_loaded(reg):
    for action in (lambda: reg.reload("nothere"), lambda: reg.unload("nothere"),
                   lambda: reg.func("nothere.add"), lambda: reg.call("nothere.add", 1, 2)):
        with pytest.raises(ModuleNotLoaded, match="'nothere' is not loaded.*reg.load"):
            action()


def test_undeclared_symbol_is_a_symbol_error_and_attribute_error(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef="long add(long, long);")
    with pytest.raises(SymbolError, match="'scaled'"):
        reg.func("sample.scaled")
    assert not hasattr(mod, "scaled")
    with pytest.raises(AttributeError):
        mod.scaled


def test_declared_but_missing_symbols_refuse_the_load(reg, moddir, samples, tmpdir_for_copies):
    install(samples["nosym"], moddir / "sample.so")
    with pytest.raises(SymbolError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF + "int no_such_one(void);")
    assert info.value.symbols == ("no_such_one", "scaled")
    assert "'scaled'" in str(info.value) and "'no_such_one'" in str(info.value)
    assert reg.status() == []
    assert private_copies(tmpdir_for_copies) == []


def test_unload(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    f = mod.add
    reg.unload("sample")
    assert reg.status() == []
    with pytest.raises(ModuleUnloaded, match="'sample' was unloaded"):
        f(1, 2)
    with pytest.raises(ModuleUnloaded):
        mod.scaled(1)
    with pytest.raises(ModuleNotLoaded):
        reg.unload("sample")
    # Loaded again: old handles stay dead, new ones work.
    again = reg.load("sample", cdef=SAMPLE_CDEF)
    assert again is not mod and again.generation == 1
    with pytest.raises(ModuleUnloaded):
        f(1, 2)
    assert reg.call("sample.add", 1, 2) == 3


def test_status_fields(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    [status] = reg.status()
    assert isinstance(status, nativereload.ModuleStatus)
    assert (status.name, status.path, status.generation) == ("sample", str(moddir / "sample.so"), 1)
    [image] = status.images
    assert isinstance(image, nativereload.ImageStatus)
    assert (image.generation, image.state, image.in_flight) == (1, "active", 0)
    assert os.path.isfile(image.copy_path)


def test_context_manager_and_closed_registry(moddir, tmpdir_for_copies, samples):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies) as reg:
        f = reg.load("sample", cdef=SAMPLE_CDEF).add
        assert f(1, 1) == 2
    assert os.listdir(tmpdir_for_copies) == []
    with pytest.raises(ModuleUnloaded):
        f(1, 1)
    with pytest.raises(NativeReloadError, match="closed"):
        reg.load("sample", cdef=SAMPLE_CDEF)


def test_info_log_lines(reg, moddir, samples, caplog):
    caplog.set_level(logging.INFO, logger="nativereload")
    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    reg.reload("sample")
    messages = [record.getMessage() for record in caplog.records if record.name == "nativereload"]
    assert any(m.startswith("loaded 'sample' generation 1 from") and " ms" in m for m in messages), messages
    assert any(m.startswith("reloaded 'sample' generation 2 in") for m in messages), messages
    assert any(m.startswith("closed 'sample' generation 1 in") for m in messages), messages


def test_errors_are_exported_and_named_for_the_package():
    for name in ("NativeReloadError", "ModuleNotFound", "ModuleNotLoaded", "LoadError", "SymbolError",
                 "InterfaceError", "ModuleUnloaded", "ModuleNameError", "ModuleConflict", "ControlError",
                 "ProtocolError", "BuildError", "DemoError"):
        cls = getattr(nativereload, name)
        assert issubclass(cls, NativeReloadError)
        assert cls.__module__ == "nativereload"
    assert issubclass(SymbolError, AttributeError)
    assert sorted(nativereload.__all__) == nativereload.__all__
    for name in nativereload.__all__:
        assert hasattr(nativereload, name)


# -- checks no test reached before (issue 13's mutation pass) -----------------------------------------------


def test_func_after_unload_raises_at_once(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    assert mod.loaded is True
    reg.unload("sample")
    assert mod.loaded is False
    with pytest.raises(ModuleUnloaded, match="'sample' was unloaded — load it again"):
        mod.func("counter_next")               # never taken before: refused when asked for, not when called
    with pytest.raises(ModuleUnloaded):
        mod.dot4
    assert "unloaded" in repr(mod)


def test_dunder_lookups_are_plain_attribute_errors(reg, moddir, samples):
    # copy, pickle and friends probe __reduce_ex__, __getstate__, ...: never a SymbolError, never a Func.
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    for name in ("__wrapped__", "__array__", "__fspath__"):
        with pytest.raises(AttributeError) as info:
            getattr(mod, name)
        assert type(info.value) is AttributeError and str(info.value) == name
    assert not hasattr(mod, "__len__")


def test_a_single_directory_string_is_one_path_entry(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=str(moddir), tmpdir=tmpdir_for_copies) as reg:
        assert reg.search_path()[:1] == [str(moddir)]
        assert reg.load("sample", cdef=SAMPLE_CDEF).version() == 1
    with Registry(path=moddir, tmpdir=tmpdir_for_copies) as reg:            # a Path too
        assert reg.search_path()[:1] == [str(moddir)]


def test_attribute_shortcuts_follow_the_cdef(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    assert mod.scaled(2) == 2                  # cached in the module's __dict__ from here on
    kept = mod.scaled
    reg.reload("sample", cdef=SAMPLE_CDEF.replace("long scaled(long);", ""), allow_interface_change=True)
    with pytest.raises(SymbolError, match="'scaled' is not a function it declares"):
        mod.scaled                             # the shortcut went with the declaration
    with pytest.raises(SymbolError, match="generation 2 has no 'scaled'"):
        kept(2)                                # a handle taken before: a valid object, a clear error
    assert mod.add(1, 2) == 3


@pytest.mark.parametrize("name", ["../x", "a/b", ""])
def test_names_are_checked_everywhere(reg, moddir, samples, name):
    install(samples["v1"], moddir / "sample.so")
    for action in (lambda: reg.load(name, cdef=SAMPLE_CDEF, file=moddir / "sample.so"),
                   lambda: reg.reload(name), lambda: reg.unload(name)):
        with pytest.raises(ModuleNameError, match="invalid module name"):
            action()


@pytest.mark.timeout(60)
def test_wait_drained_wakes_when_an_image_drains(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    read_fd, write_fd = os.pipe()
    caller = threading.Thread(target=mod.wait_fd, args=(read_fd,))
    caller.start()
    while reg.status()[0].images[0].in_flight == 0:
        time.sleep(0.005)
    reg.reload("sample")
    threading.Timer(0.2, os.write, (write_fd, b"x")).start()
    started = time.monotonic()
    assert reg.wait_drained(timeout=30) is True
    assert time.monotonic() - started < 10           # woken by the drain, not by the timeout
    caller.join(10)
    os.close(read_fd)
    os.close(write_fd)


@pytest.mark.timeout(60)
def test_unload_with_two_generations_draining(reg, moddir, samples):
    # Each drained image updates the bookkeeping from the caller's thread: no error may reach the caller.
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    pipes = [os.pipe(), os.pipe()]
    results, errors = [], []

    def call(read_fd):
        try:
            results.append(mod.wait_fd(read_fd))
        except BaseException as exc:      # noqa: BLE001
            errors.append(exc)

    threads = []
    for generation, (read_fd, _write_fd) in enumerate(pipes, 1):
        thread = threading.Thread(target=call, args=(read_fd,))
        thread.start()
        threads.append(thread)
        while sum(i.in_flight for i in reg.status()[0].images) < generation:
            time.sleep(0.005)
        reg.reload("sample")
    reg.unload("sample")
    assert [i.state for i in reg.status()[0].images] == ["retired", "retired"]
    for _read_fd, write_fd in pipes:
        os.write(write_fd, b"x")
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(results) == 2
    assert reg.wait_drained(timeout=10) and reg.status() == []
    for read_fd, write_fd in pipes:
        os.close(read_fd)
        os.close(write_fd)


def test_each_gate_fixture_uses_its_gate(reg, gate_impl):
    from nativereload import gate

    assert reg._gate is (gate.C if gate_impl in ("c", "compiled") else gate.PYTHON)
    assert reg._calls.mode == {"c": "gate", "compiled": "compiled"}.get(gate_impl, reg._calls.mode)


def test_every_outcome_is_logged_with_its_time(reg, moddir, samples, caplog):
    caplog.set_level(logging.INFO, logger="nativereload")
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    reg.reload("sample")                                     # nothing in flight: the old image closes at once
    pipes = [os.pipe(), os.pipe()]
    callers = [threading.Thread(target=mod.wait_fd, args=(read_fd,)) for read_fd, _ in pipes]
    for caller in callers:
        caller.start()
    while reg.status()[0].images[-1].in_flight < 2:
        time.sleep(0.005)
    reg.reload("sample")                                     # two calls in flight
    reg.unload("sample")                                     # the new image is idle: closes at once
    for _read_fd, write_fd in pipes:
        os.write(write_fd, b"x")
    for caller in callers:
        caller.join(10)
    assert reg.close(timeout=10)
    messages = [r.getMessage() for r in caplog.records if r.name == "nativereload"]

    def line(pattern):
        found = [m for m in messages if re.fullmatch(pattern, m)]
        assert found, (pattern, messages)
        return found[0]

    times = [
        line(rf"loaded 'sample' generation 1 from {re.escape(str(moddir / 'sample.so'))} in ([\d.]+) ms"),
        line(r"reloaded 'sample' generation 2 in ([\d.]+) ms \(generation 1 closed\)"
             r"; note: sample.so is unchanged since generation 1 — did the build fail\?"),
        line(r"reloaded 'sample' generation 3 in ([\d.]+) ms \(generation 2 draining, 2 calls in flight\)"
             r"; note: sample.so is unchanged since generation 1 — did the build fail\?"),
        line(r"unloaded 'sample' generation 3 in ([\d.]+) ms \(closed\)"),
        line(r"closed the registry in ([\d.]+) ms \(all images closed\)"),
    ]
    for message in times:
        assert 0 <= float(re.search(r"in ([\d.]+) ms", message).group(1)) < 900, message
    for read_fd, write_fd in pipes:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.timeout(60)
def test_unload_and_close_with_a_call_in_flight_say_so(moddir, samples, tmpdir_for_copies, caplog, gate_impl):
    caplog.set_level(logging.INFO, logger="nativereload")
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    read_fd, write_fd = os.pipe()
    caller = threading.Thread(target=mod.wait_fd, args=(read_fd,))
    caller.start()
    while reg.status()[0].images[0].in_flight == 0:
        time.sleep(0.005)
    reg.unload("sample")
    assert reg.close(timeout=0.05) is False
    os.write(write_fd, b"x")
    caller.join(10)
    assert reg.wait_drained(10)
    messages = [r.getMessage() for r in caplog.records if r.name == "nativereload"]
    assert any(m.endswith("(draining, 1 in flight)") and m.startswith("unloaded 'sample' generation 1") for m in
               messages), messages
    assert any(m.endswith("(images still draining)") for m in messages), messages
    os.close(read_fd)
    os.close(write_fd)


def test_module_names_must_be_strings(reg):
    for name in (42, None, b"sample"):
        with pytest.raises(ModuleNameError, match=f"module name must be a string, not {type(name).__name__}"):
            reg.load(name, cdef=SAMPLE_CDEF)


def test_image_status_defaults(reg):
    assert nativereload.ImageStatus(1, "active", 0, "/x").copy_deleted is False


def test_a_cdef_without_functions(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef="typedef int sample_int;")
    with pytest.raises(SymbolError, match=r"'add' is not a function it declares \(declared: none\)"):
        mod.func("add")


def test_a_first_load_without_a_cdef_needs_the_file_first(reg, moddir, samples):
    # With no cdef the interface may come from the file itself: a missing file is what to fix first.
    with pytest.raises(ModuleNotFound, match="module 'does_not_exist' not found"):
        reg.load("does_not_exist")
    install(samples["v1"], moddir / "sample.so")
    with pytest.raises(InterfaceError, match="it embeds none and no cdef was given"):
        reg.load("sample")


def test_an_empty_search_path_says_so(tmpdir_for_copies, monkeypatch):
    monkeypatch.delenv("NATIVERELOAD_PATH", raising=False)
    with Registry(tmpdir=tmpdir_for_copies) as reg:
        with pytest.raises(ModuleNotFound, match="module 'x' not found: the search path is empty — pass Registry"):
            reg.load("x", cdef=SAMPLE_CDEF)


def test_a_closed_registry_refuses_reload(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    reg.load("sample", cdef=SAMPLE_CDEF)
    reg.close()
    with pytest.raises(NativeReloadError, match="this registry is closed"):
        reg.reload("sample")


def test_auto_reload_starts_a_watcher_and_only_then(moddir, tmpdir_for_copies):
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies) as plain:
        assert plain._closers == []
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, auto_reload=True) as watching:
        assert len(watching._closers) == 1
    assert watching._closers == []


def test_directories_of_another_tmpdir_go_when_idle(moddir, samples, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setenv("TMPDIR", str(first))
    with Registry(path=[moddir]) as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
        monkeypatch.setenv("TMPDIR", str(second))
        install(samples["undef"], moddir / "sample.so")
        with pytest.raises(nativereload.LoadError):
            reg.reload("sample")                    # refused: its directory in second goes at once
        assert os.listdir(second) == [] and len(os.listdir(first)) == 1
        install(samples["v2"], moddir / "sample.so")
        staged = reg.prepare("sample")              # prepared in second, then aborted: its directory goes
        assert len(os.listdir(second)) == 1
        staged.abort()
        assert os.listdir(second) == [] and len(os.listdir(first)) == 1
        reg.reload("sample")                        # the image in first closed: its directory goes too
        assert os.listdir(first) == [] and len(os.listdir(second)) == 1


@pytest.mark.parametrize("qualname", ["add", ".add", "sample.", "", 42])
def test_func_names_need_module_and_symbol(reg, qualname):
    with pytest.raises(ModuleNameError, match="is not 'module.symbol' — e.g. reg.func"):
        reg.func(qualname)


def test_close_stops_what_was_added_first_and_logs_a_failure(moddir, tmpdir_for_copies, caplog):
    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("cannot stop")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    reg._add_closer(lambda: calls.append("server"))
    reg._add_closer(broken)
    with caplog.at_level(logging.ERROR, logger="nativereload"):
        assert reg.close() is True
    assert calls == ["server", "broken"]
    assert "error while stopping" in caplog.text and "cannot stop" in caplog.text
    reg.close()
    assert calls == ["server", "broken"]             # once only


def test_serve_and_watch_files_return_what_they_started(moddir, tmpdir_for_copies, short_tmp_path):
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies) as reg:
        watcher = reg.watch_files()
        server = reg.serve(short_tmp_path / "s.sock")
        assert watcher is not None and server is not None
        assert os.path.exists(short_tmp_path / "s.sock")
    assert not os.path.exists(short_tmp_path / "s.sock")


def test_a_new_tmpdir_is_swept_when_first_used(moddir, samples, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setenv("TMPDIR", str(first))
    with Registry(path=[moddir]) as reg:
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = second / f"nativereload-{dead.pid}-left"
        stale.mkdir(mode=0o700)
        (stale / ".lock").write_bytes(b"")
        monkeypatch.setenv("TMPDIR", str(second))
        reg.load("sample", cdef=SAMPLE_CDEF)
        assert not stale.exists()


def test_removed_directories_are_forgotten(reg, moddir, samples):
    from nativereload import workdir as workdir_module

    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    [workdir] = reg._workdirs
    assert workdir in workdir_module._open_workdirs
    reg.unload("sample")
    assert workdir not in workdir_module._open_workdirs and len(reg._workdirs) == 0


def test_history_must_be_a_count_of_images(tmpdir_for_copies):
    for bad in (-1, "3", 2.5, None):
        with pytest.raises(ValueError, match=r"history must be a number of images >= 0, not "):
            Registry(tmpdir=tmpdir_for_copies, history=bad)
    with Registry(tmpdir=tmpdir_for_copies, history=0):
        pass


def test_reload_keeps_handles_and_destructors_by_default_and_help_says_so():
    parameters = inspect.signature(Registry.reload).parameters
    assert repr(parameters["handles"].default) == "<keep>"
    assert repr(parameters["destructors"].default) == "<keep>"


def test_missing_must_be_error_or_lazy(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    with pytest.raises(ValueError, match="missing must be 'error' or 'lazy', not 'skip'"):
        reg.load("sample", cdef=SAMPLE_CDEF, missing="skip")
    assert reg.status() == []


def test_prepare_checks_the_name_and_logs_its_time(reg, moddir, samples, caplog):
    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    with pytest.raises(ModuleNameError, match="invalid module name"):
        reg.prepare("../sample")
    with caplog.at_level(logging.INFO, logger="nativereload"):
        staged = reg.prepare("sample")
    staged.abort()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared ")]
    found = re.fullmatch(r"prepared 'sample' generation 2 in ([\d.]+) ms \(generation 1 serving\)", line)
    assert found, line
    assert 0 <= float(found.group(1)) < 900


def test_pin_by_name_checks_the_name_and_that_it_is_loaded(reg):
    with pytest.raises(ModuleNameError, match="invalid module name"):
        reg.pin("../sample")
    with pytest.raises(ModuleNotLoaded, match="'sample' is not loaded"):
        reg.pin("sample")


def test_close_returns_after_every_event_was_delivered(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    seen = []

    def slow_callback(event):
        time.sleep(0.05)                # callbacks run on their own thread: close() must wait for them
        seen.append(event.kind)

    registry = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    registry.load("sample", cdef=SAMPLE_CDEF)
    registry.on_reload(slow_callback)
    registry.reload("sample")
    assert registry.close(timeout=10)
    assert seen == ["prepared", "committed", "drained", "unloaded", "drained"]


def timer_threads() -> list[threading.Thread]:
    """The threading.Timer threads alive (the held-image warnings among them)."""
    return [thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)]


def test_a_reload_of_an_idle_module_leaves_no_held_warning_timer(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    before = timer_threads()
    for _ in range(5):
        reg.reload("sample")        # each old image closes at once: nothing to warn about later
    assert timer_threads() == before


def test_a_process_exits_with_a_pin_and_a_pointer_result_held_and_a_warning_timer_running(moddir, samples,
                                                                                          tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    script = f"""if True:
        from nativereload import Registry
        reg = Registry(path=[{str(moddir)!r}], tmpdir={str(tmpdir_for_copies)!r}, held_warning=600)
        mod = reg.load("sample", cdef={SAMPLE_CDEF!r})
        pin = mod.pin()
        text = mod.version_string()     # a pointer result: it holds generation 1 too
        reg.reload("sample")            # generation 1 stays held: its 600 s warning timer runs
        """
    # The pin and the pointer result, freed by the final collection, used to start the drain thread there
    # and hang the exit for ever; a non-daemon timer would hold it for 600 s.
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_the_held_warning_timer_is_cancelled_when_the_image_closes(moddir, samples, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, held_warning=600) as registry:
        before = timer_threads()
        module = registry.load("sample", cdef=SAMPLE_CDEF)
        pin = module.pin()
        registry.reload("sample")                   # generation 1 stays pinned: its warning timer runs
        assert len(timer_threads()) == len(before) + 1
        pin.release()                               # it closes: the timer goes with it, not in 600 s
        assert registry.wait_drained(timeout=10)
        for _ in range(1000):
            if timer_threads() == before:
                break
            threading.Event().wait(0.01)
        assert timer_threads() == before
