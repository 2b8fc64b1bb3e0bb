"""File watching: replaced module files reload in-process; edited sources build and reload through `watch`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import SAMPLE_CDEF, install, run_python
from test_control import ServingChild, child_env, runtime_dir  # noqa: F401  (fixture)

from nativereload import Registry, control


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, context=lambda: ""):
    """Poll ``predicate`` until it returns a true value; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s\n{context()}")


# ----------------------------------------------------------------------------- in-process module files

@pytest.mark.timeout(60)
def test_auto_reload_picks_up_a_replaced_file(samples, moddir, tmpdir_for_copies, caplog):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, auto_reload=True) as reg:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        version = mod.version
        assert version() == 1
        install(samples["v2"], moddir / "sample.so")
        wait_for(lambda: mod.generation == 2)
        assert version() == 2
        # A failed reload (missing symbol) is logged; the old version keeps serving...
        install(samples["nosym"], moddir / "sample.so")
        wait_for(lambda: any("automatic reload" in r.getMessage() and "scaled" in r.getMessage()
                             for r in caplog.records))
        assert mod.generation == 2 and version() == 2
        # ...and the next good build is picked up.
        install(samples["v3"], moddir / "sample.so")
        wait_for(lambda: mod.generation == 3)
        assert version() == 3


@pytest.mark.timeout(60)
def test_watch_files_and_close(samples, moddir, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    try:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        watcher = reg.watch_files()
        assert reg.watch_files() is watcher  # one watcher per registry: never two reloads per change
        install(samples["v2"], moddir / "sample.so")
        wait_for(lambda: mod.generation == 2)
        time.sleep(0.6)  # three more polls: a second watcher would reload again
        assert mod.generation == 2
        watcher.close()
        assert watcher.closed
        install(samples["v3"], moddir / "sample.so")
        time.sleep(0.6)
        assert mod.generation == 2
    finally:
        reg.close()


@pytest.mark.timeout(60)
def test_file_replaced_before_the_first_poll_is_noticed(samples, moddir, tmpdir_for_copies):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies) as reg:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        time.sleep(0.05)  # the new file's mtime must be later than the copy's
        install(samples["v2"], moddir / "sample.so")
        reg.watch_files()
        wait_for(lambda: mod.generation == 2)


@pytest.mark.timeout(120)
def test_half_written_file_is_never_loaded(samples, moddir):
    """Written in place, slowly: the watcher must wait for the complete file (in a child, so a SIGBUS fails)."""
    install(samples["v1"], moddir / "sample.so")
    code = textwrap.dedent(f"""
        import os, time, nativereload
        path = {str(moddir / "sample.so")!r}
        new = open({str(samples["v2"])!r}, "rb").read()
        reg = nativereload.Registry(path=[{str(moddir)!r}], auto_reload=True)
        mod = reg.load("sample", cdef={SAMPLE_CDEF!r})
        with open(path + ".tmp", "wb") as f:
            f.write(new[: len(new) // 3])
        os.replace(path + ".tmp", path)          # a new file that is only a third there
        with open(path, "r+b") as f:
            for chunk in range(len(new) // 3, len(new), 4096):
                time.sleep(0.15)                  # slower than the watcher polls
                f.seek(chunk)
                f.write(new[chunk: chunk + 4096])
                f.flush()
                assert mod.version() == 1 and mod.generation == 1, "loaded a partial file"
        deadline = time.monotonic() + 30
        while mod.generation == 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        print(mod.generation, mod.version())
        reg.close()
    """)
    result = run_python(code, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2"]


# ----------------------------------------------------------------------------- nativereload watch

PROJECT = """
cmake_minimum_required(VERSION 3.16)
project(watched C)
find_package(nativereload REQUIRED)
nativereload_add_module(sample SOURCES sample.c)
"""

SOURCE = """
int version(void) { return %s; }
long add(long a, long b) { return a + b; }
long scaled(long x) { return x * %s; }
"""


def write_source(project: Path, version: str) -> None:
    # write + rename, like an editor's safe save
    partial = project / ".sample.c.partial"
    partial.write_text(SOURCE % (version, version))
    os.replace(partial, project / "sample.c")


def _has_watchfiles() -> bool:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["poll", pytest.param("watchfiles", marks=pytest.mark.skipif(
    not _has_watchfiles(), reason="watchfiles not installed (the optional [watch] extra)"))])
def test_watch_builds_and_reloads_an_edited_source(tmp_path, runtime_dir, how):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(PROJECT)
    write_source(project, "1")
    env = child_env(runtime_dir)
    built = subprocess.run([sys.executable, "-m", "nativereload", "build", "--source-dir", str(project),
                            "--build-dir", str(project / "build")], env=env, capture_output=True, text=True,
                           timeout=200)
    assert built.returncode == 0, built.stderr
    child = ServingChild(project / "build" / "modules", runtime_dir,
                         cdef="int version(void); long add(long, long); long scaled(long);")
    watcher = subprocess.Popen([sys.executable, "-m", "nativereload", "watch", "--source-dir", str(project),
                                "--build-dir", str(project / "build"), "--pid", str(child.pid),
                                "--interval", "0.2", *(["--poll"] if how == "poll" else [])],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A reader thread: select() on a buffered text pipe misses lines already in its buffer.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()

    def saw(text: str) -> bool:
        return any(text in line for line in list(lines))

    try:
        wait_for(lambda: saw("no module changed"), timeout=60, context=lambda: ''.join(lines))  # the start-up build: up to date
        write_source(project, "2")
        wait_for(lambda: child.calls()["version"] == 2, timeout=120, context=lambda: ''.join(lines))
        wait_for(lambda: saw("reloaded 'sample' generation 1 \u2192 2"))

        # A broken edit: reported, the loop goes on, the old code keeps serving.
        (project / "sample.c").write_text("int version(void) { return nope; }\n")
        wait_for(lambda: saw("error: build failed"), timeout=120, context=lambda: ''.join(lines))
        assert child.calls()["version"] == 2

        write_source(project, "3")
        wait_for(lambda: child.calls()["version"] == 3, timeout=120, context=lambda: ''.join(lines))
        calls = child.calls()
        assert calls["failed"] == [] and calls["generation"] == 3
        assert watcher.poll() is None
        doc = control.request(child.socket, "status")
        assert [i["generation"] for i in doc["modules"][0]["images"]] == [3]
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()
        reader.join(timeout=10)
        child.stop()
    assert watcher.returncode == 0, "".join(lines)
    assert "Traceback" not in "".join(lines)


@pytest.mark.parametrize("name", ["sed5J3aPj", "sedAb12Cd", "4913", ".counter.c.swp", "counter.c~", "#counter.c#",
                                  ".#counter.c", "counter.c.tmp", "counter.c___jb_tmp___", "counter.o", "counter.d",
                                  ".goutputstream-XK2L1Z", "counter.c.orig"])
def test_editor_and_tool_temporary_files_are_ignored(name):
    from nativereload.watch import ignored_name

    assert ignored_name(name)


@pytest.mark.parametrize("name", ["counter.c", "counter.h", "CMakeLists.txt", "sed.c", "sedimentary", "v2.c",
                                  "module.cmake", "Makefile"])
def test_sources_are_not_ignored(name):
    from nativereload.watch import ignored_name

    assert not ignored_name(name)


def test_watch_with_nothing_to_build_exits_2(tmp_path, capsys):
    from nativereload import cli

    assert cli.main(["watch", "--source-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: nothing to build: no CMakeLists.txt in {tmp_path} and no C files given")
    assert "hint: nativereload watch FILE.c" in err
    assert cli.main(["watch", str(tmp_path / "nope.c")]) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(240)
def test_watch_c_files_reloads_and_says_what_it_does(tmp_path, runtime_dir):
    """`nativereload watch counter.c`: no project; timestamps; what it watches and how; temp files ignored."""
    (tmp_path / "sample.c").write_text(SOURCE % ("1", "1"))
    env = child_env(runtime_dir)
    built = subprocess.run([sys.executable, "-m", "nativereload", "build", "sample.c"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=200)
    assert built.returncode == 0, built.stderr
    child = ServingChild(tmp_path / "build" / "modules", runtime_dir,
                         cdef="int version(void); long add(long, long); long scaled(long);")
    watcher = subprocess.Popen([sys.executable, "-m", "nativereload", "watch", "sample.c", "--poll", "--interval",
                                "0.2"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()

    def saw(text: str) -> bool:
        return any(text in line for line in list(lines))

    try:
        wait_for(lambda: saw("no module changed"), timeout=60, context=lambda: "".join(lines))
        start = next(line for line in lines if "watching" in line)
        assert re.match(r"\[\d\d:\d\d:\d\d\] nativereload watch: watching ", start), start
        assert f"sample.c -> {tmp_path / 'build' / 'modules' / 'sample.so'}" in start
        assert "polling every 0.2 s (--poll)" in start
        # An editor's temporary file beside the source is not a change.
        (tmp_path / "sed5J3aPj").write_text("x")
        (tmp_path / "4913").write_text("")
        time.sleep(1.0)
        assert not saw("changed:")
        write_source(tmp_path, "2")
        wait_for(lambda: child.calls()["version"] == 2, timeout=120, context=lambda: "".join(lines))
        wait_for(lambda: saw("reloaded 'sample' generation 1 \u2192 2"), context=lambda: "".join(lines))
        changed = next(line for line in lines if "changed:" in line)
        assert re.match(r"\[\d\d:\d\d:\d\d\] changed: sample.c; building", changed), changed
        assert "sed5J3aPj" not in "".join(lines)
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()
        reader.join(timeout=10)
        child.stop()
    assert watcher.returncode == 0, "".join(lines)
