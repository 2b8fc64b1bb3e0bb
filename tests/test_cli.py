"""The nativereload command: in-process main([...]) for usage paths, the real command against real children."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, install
from test_control import child_env, runtime_dir, spawn  # noqa: F401  (fixtures)

from nativereload import cli
from nativereload.cli.tables import format_status


def nr(*args: str, runtime: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real command (``python -m nativereload``) as a subprocess."""
    return subprocess.run([sys.executable, "-m", "nativereload", *args], capture_output=True, text=True,
                          env=child_env(runtime), timeout=timeout, stdin=subprocess.DEVNULL)


def error_line(stderr: str) -> str:
    """The CLI's own ``error:`` line (a dependency may print a warning before it)."""
    return cli_line(stderr, "error: ")


def cli_line(stderr: str, prefix: str) -> str:
    """The first line of the CLI's own output starting with ``prefix`` ("" if there is none)."""
    return next((line for line in stderr.splitlines() if line.startswith(prefix)), "")


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


# ----------------------------------------------------------------------------- in-process

def test_cmake_dir(capsys):
    assert cli.main(["--cmake-dir"]) == 0
    out = capsys.readouterr().out.strip()
    assert (Path(out) / "nativereloadConfig.cmake").is_file()


@pytest.mark.parametrize("argv", [[], ["reload"], ["frobnicate"], ["status", "--pid", "x"],
                                  ["reload", "m", "--pid", "1", "--all"], ["status", "--socket", "a", "--all"]])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\nhint: " in err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "reload" in capsys.readouterr().out


def test_no_process_is_an_operation_failure(runtime_dir, capsys):
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no nativereload process of this user is serving")
    assert "hint: call reg.serve()" in err
    assert cli.main(["reload", "sample", "--pid", "1"]) == 1
    assert cli.main(["status", "--socket", str(runtime_dir / "nope.sock")]) == 1
    assert "no control socket at" in capsys.readouterr().err


def test_socket_option_that_is_not_a_socket(runtime_dir, tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("")
    for path in (regular, tmp_path):
        assert cli.main(["reload", "sample", "--socket", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} is not a socket\n") and "\nhint: " in err


def test_watch_without_sources_fails_before_building(tmp_path, capsys):
    assert cli.main(["watch", "--source-dir", str(tmp_path / "missing"), "--build-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith(f"error: source directory {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "b").exists()


def test_status_table_says_what_became_of_old_images():
    def module(generation, *images):
        return {"name": "m", "path": "/x/m.so", "generation": generation,
                "images": [{"generation": g, "state": s, "in_flight": n} for g, s, n in images]}

    def table(*modules):
        return format_status({"ok": True, "pid": 7, "modules": list(modules)}, "/s")

    assert "drained" not in table(module(1, (1, "active", 0)))
    assert "  m: old image drained (generation 1)" in table(module(2, (2, "active", 0)))
    assert "  m: old images drained (generations 1-3)" in table(module(4, (4, "active", 0)))
    assert "  m: generation 2: retired — 3 call(s); old image drained (generation 1)" in table(
        module(3, (2, "retired", 3), (3, "active", 1)))
    # Unloaded: nothing active, the last image still draining.
    assert "  m: generation 2: retired — 1 call(s); old image drained (generation 1)" in table(
        module(2, (2, "retired", 1)))
    # What holds a retired image, in words (the registry's held_by).
    held = module(2, (1, "retired", 0), (2, "active", 0))
    held["images"][0]["held_by"] = "0 calls, 2 handles (sqlite3 *), 1 pin"
    assert "  m: generation 1: retired — 0 calls, 2 handles (sqlite3 *), 1 pin" in table(held)


# ----------------------------------------------------------------------------- against running processes

@pytest.mark.timeout(120)
def test_reload_and_status_end_to_end(spawn, samples, moddir, runtime_dir):
    child = spawn()
    status = nr("status", "--json", runtime=runtime_dir)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["pid"] == child.pid and doc["modules"][0]["name"] == "sample"
    assert doc["modules"][0]["generation"] == 1

    table = nr("status", runtime=runtime_dir)
    assert table.returncode == 0
    assert f"pid {child.pid}" in table.stdout and "sample" in table.stdout and "active" in table.stdout

    install(samples["v2"], moddir / "sample.so")
    reload = nr("reload", "sample", runtime=runtime_dir)
    assert reload.returncode == 0, reload.stderr
    assert f"pid {child.pid} [python]: reloaded 'sample' generation 1 \u2192 2 in " in reload.stdout
    assert reload.stdout.rstrip().endswith(" ms")
    calls = child.calls()
    assert calls["version"] == 2 and calls["failed"] == []

    # The old image drained: only generation 2 is left, and the table says so.
    doc = json.loads(nr("status", "--json", "--pid", str(child.pid), runtime=runtime_dir).stdout)
    assert [i["generation"] for i in doc["modules"][0]["images"]] == [2]
    table = nr("status", runtime=runtime_dir)
    assert "sample: old image drained (generation 1)" in table.stdout

    as_json = nr("reload", "sample", "--json", "--socket", str(child.socket), runtime=runtime_dir)
    assert as_json.returncode == 0
    doc = json.loads(as_json.stdout)
    assert doc["ok"] and doc["generation_before"] == 2 and doc["generation"] == 3


@pytest.mark.timeout(120)
def test_failures_exit_1_and_child_keeps_serving(spawn, samples, moddir, runtime_dir):
    child = spawn()
    missing = nr("reload", "nosuch", runtime=runtime_dir)
    assert missing.returncode == 1
    no_traceback(missing)
    # The CLI's own lines (a dependency may warn on stderr before them: cffi on free-threaded builds)
    error = cli_line(missing.stderr, "error: ")
    assert error.startswith(f"error: pid {child.pid} [python]: reload of 'nosuch' failed: ModuleNotLoaded")
    assert cli_line(missing.stderr, "hint: ")

    install(samples["nosym"], moddir / "sample.so")
    nosym = nr("reload", "sample", runtime=runtime_dir)
    assert nosym.returncode == 1
    no_traceback(nosym)
    assert "SymbolError" in nosym.stderr and "scaled" in nosym.stderr
    as_json = nr("reload", "sample", "--json", runtime=runtime_dir)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"]["type"] == "SymbolError"

    install(samples["undef"], moddir / "sample.so")
    undef = nr("reload", "sample", runtime=runtime_dir)
    assert undef.returncode == 1 and "LoadError" in undef.stderr
    no_traceback(undef)

    calls = child.calls()
    assert calls["version"] == 1 and calls["generation"] == 1 and calls["failed"] == []
    assert child.alive()


@pytest.mark.timeout(120)
def test_several_processes(spawn, samples, moddir, runtime_dir):
    first, second = spawn(), spawn()
    ambiguous = nr("reload", "sample", runtime=runtime_dir)
    assert ambiguous.returncode == 1
    no_traceback(ambiguous)
    assert f"pid {first.pid}" in ambiguous.stderr and f"pid {second.pid}" in ambiguous.stderr
    assert "--all" in ambiguous.stderr

    status = nr("status", "--all", "--json", runtime=runtime_dir)
    assert status.returncode == 0
    assert sorted(entry["pid"] for entry in json.loads(status.stdout)) == sorted([first.pid, second.pid])

    install(samples["v2"], moddir / "sample.so")
    reload = nr("reload", "sample", "--all", runtime=runtime_dir)
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.count("generation 1 \u2192 2") == 2
    assert first.calls()["version"] == 2 and second.calls()["version"] == 2

    only_first = nr("reload", "sample", "--pid", str(first.pid), "--json", runtime=runtime_dir)
    assert json.loads(only_first.stdout)["generation"] == 3

    # --all succeeds only if every target reloaded: unload it in one of them.
    assert nr("unload", "sample", "--pid", str(second.pid), runtime=runtime_dir).returncode == 0
    partial = nr("reload", "sample", "--all", "--json", runtime=runtime_dir)
    assert partial.returncode == 1
    assert sorted(entry["ok"] for entry in json.loads(partial.stdout)) == [False, True]


@pytest.mark.timeout(120)
def test_socket_of_killed_process_is_removed_by_the_cli(spawn, runtime_dir):
    child = spawn()
    os.kill(child.pid, signal.SIGKILL)
    child.proc.wait(timeout=30)
    assert child.socket.exists()
    status = nr("status", runtime=runtime_dir)
    assert status.returncode == 1
    assert "no nativereload process" in status.stderr
    assert not child.socket.exists()


@pytest.mark.timeout(120)
def test_python_dash_m_runs_the_cli(runtime_dir):
    result = nr("--cmake-dir", runtime=runtime_dir)
    assert result.returncode == 0
    assert Path(result.stdout.strip()) == ROOT / "nativereload" / "cmake"


@pytest.mark.timeout(120)
def test_console_script(runtime_dir):
    script = shutil.which("nativereload", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if script is None:
        pytest.skip("nativereload is not installed as a console script here")
    result = subprocess.run([script, "status"], capture_output=True, text=True, env=child_env(runtime_dir),
                            timeout=60)
    assert result.returncode == 1 and cli_line(result.stderr, "error: ").startswith("error: no nativereload process")


@pytest.mark.timeout(120)
def test_unload_and_status_table(spawn, runtime_dir):
    first, second = spawn(), spawn()
    unload = nr("unload", "sample", "--pid", str(first.pid), runtime=runtime_dir)
    assert unload.returncode == 0, unload.stderr
    assert f"pid {first.pid} [python]: unloaded 'sample'" in unload.stdout
    table = nr("status", "--all", runtime=runtime_dir)
    assert table.returncode == 0
    blocks = table.stdout.split("\n\n")
    assert len(blocks) == 2
    by_pid = {int(block.split()[1]): block for block in blocks}
    assert "sample" in by_pid[second.pid] and "active" in by_pid[second.pid]
    assert "active" not in by_pid[first.pid]
    again = nr("unload", "sample", "--pid", str(first.pid), runtime=runtime_dir)
    assert again.returncode == 1 and "ModuleNotLoaded" in again.stderr


# ----------------------------------------------------------------------------- help, version, JSON on failure

def test_version(capsys):
    from nativereload import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nativereload {__version__}"


@pytest.mark.parametrize("command", ["build", "reload", "unload", "status", "ps", "watch", "demo", "cdef", "embed",
                                     "check"])
def test_each_subcommand_explains_itself(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 8, text         # a sentence, not a blank
    assert "examples:\n  nativereload " + command in text
    if command in ("reload", "unload", "status"):
        assert "With none of them, the only live process of yours is used" in text
        assert "--name NAME" in text


def json_failure(argv: list[str], capsys, code: int = 1) -> dict:
    """Run ``main(argv)``: it must fail with ``code``, one JSON document on stdout, ``error:`` on stderr."""
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    doc = json.loads(captured.out)             # exactly one document: json.loads refuses trailing text
    assert doc["ok"] is False and set(doc["error"]) == {"type", "message", "hint"}
    assert error_line(captured.err) == f"error: {doc['error']['message']}".splitlines()[0]
    return doc


def test_every_failure_prints_one_json_document(runtime_dir, tmp_path, monkeypatch, capsys):
    for argv in (["status", "--json"], ["reload", "counter", "--json"], ["unload", "counter", "--json"],
                 ["reload", "counter", "--all", "--json"], ["status", "--name", "api", "--json"],
                 ["reload", "counter", "--pid", "1", "--json"]):
        doc = json_failure(argv, capsys)
        assert doc["error"]["type"] == "ControlError"
        assert "no nativereload process" in doc["error"]["message"] or "process 1 has no live" in doc["error"]["message"]
    doc = json_failure(["status", "--socket", str(tmp_path), "--json"], capsys)
    assert "is not a socket" in doc["error"]["message"]
    # Usage errors too, when --json is among the arguments.
    doc = json_failure(["reload", "--json"], capsys, code=2)
    assert doc["error"]["type"] == "UsageError"
    doc = json_failure(["status", "--pid", "1", "--all", "--json"], capsys, code=2)
    assert "one way" in doc["error"]["message"]
    # build: no project and no files; a missing file; a compile error.
    monkeypatch.chdir(tmp_path)
    doc = json_failure(["build", "--json"], capsys)
    assert doc["error"]["type"] == "BuildError" and "no CMakeLists.txt" in doc["error"]["message"]
    assert "nativereload build FILE.c" in doc["error"]["hint"]
    assert list(tmp_path.iterdir()) == []          # no empty build/ left behind
    doc = json_failure(["build", "nope.c", "--json"], capsys)
    assert "nope.c does not exist" in doc["error"]["message"]
    (tmp_path / "bad.c").write_text("int f(void) { return nope; }\n")
    doc = json_failure(["build", "bad.c", "--json"], capsys)
    assert doc["error"]["type"] == "BuildError" and "compiling bad.c failed" in doc["error"]["message"]
    assert not (tmp_path / "build" / "modules" / "bad.so").exists()


def test_ps_with_nothing_serving(runtime_dir, capsys):
    assert cli.main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["ps"]) == 0
    assert "no nativereload process of yours is serving" in capsys.readouterr().err


# ----------------------------------------------------------------------------- build FILE.c

COUNTER = """
#ifndef VERSION
#define VERSION 1
#endif
#include "counter.h"
long add(long a, long b) { return a + b; }
int version(void) { return VERSION; }
static int helper(void) { return 0; }
"""


def test_build_c_files_without_a_project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "counter.h").write_text("#define UNUSED 1\n")
    (tmp_path / "counter.c").write_text(COUNTER)
    assert cli.main(["build", "counter.c", "-I", "include"]) == 0
    so = tmp_path / "build" / "modules" / "counter.so"
    assert capsys.readouterr().out == f"built counter: {so}\n"
    from nativereload import Registry

    with Registry(path=["build/modules"], tmpdir=tmp_path) as reg:
        mod = reg.load("counter", cdef="long add(long, long); int version(void);")
        assert mod.add(2, 3) == 5 and mod.version() == 1
        # Nothing changed: nothing built, the file untouched.
        before = so.stat()
        assert cli.main(["build", "counter.c", "-I", "include", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["built"] == [] and doc["modules"] == [{"name": "counter", "path": str(so)}]
        assert so.stat().st_ino == before.st_ino
        # Another define is another build; so is an edited header.
        assert cli.main(["build", "counter.c", "-I", "include", "-DVERSION=2"]) == 0
        assert "built counter" in capsys.readouterr().out
        assert so.stat().st_ino != before.st_ino
        reg.reload("counter")
        assert mod.version() == 2
        assert cli.main(["build", "counter.c", "-I", "include", "-DVERSION=2"]) == 0
        assert capsys.readouterr().out.startswith("up to date")
        os.utime(tmp_path / "include" / "counter.h", ns=(1, 1))
        assert cli.main(["build", "counter.c", "-I", "include", "-DVERSION=2"]) == 0
        assert "built counter" in capsys.readouterr().out
        # -o and --name; flags the CMake helper uses.
        assert cli.main(["build", "counter.c", "-I", "include", "-o", "out", "--name", "other", "-lm", "-v"]) == 0
        assert (tmp_path / "out" / "other.so").is_file()
        dynamic = subprocess.run(["readelf", "-d", str(tmp_path / "out" / "other.so")], capture_output=True,
                                 text=True).stdout
        if dynamic:
            assert "SYMBOLIC" in dynamic


def test_build_reports_the_compilers_own_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.c").write_text("int f(void)\n{\n    return nope;\n}\n")
    assert cli.main(["build", "bad.c"]) == 1
    err = capsys.readouterr().err
    assert "bad.c:3:" in err and "nope" in err
    assert error_line(err).startswith("error: compiling bad.c failed")


# ----------------------------------------------------------------------------- named processes, ps

@pytest.mark.timeout(120)
def test_processes_by_name_and_ps(moddir, runtime_dir, samples):
    install(samples["v1"], moddir / "sample.so")
    from test_control import ServingChild

    children = [ServingChild(moddir, runtime_dir, process_name=n) for n in ("api", "worker", "worker")]
    api, w1, w2 = children
    try:
        status = nr("status", "--name", "api", "--json", runtime=runtime_dir)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["pid"] == api.pid and doc["name"] == "api" and doc["argv"][:2] == [sys.executable, "-c"]
        # Two workers share a name: ambiguous, and the error lists them with pid, name and command line.
        ambiguous = nr("reload", "sample", "--name", "worker", runtime=runtime_dir)
        assert ambiguous.returncode == 1
        line = error_line(ambiguous.stderr)
        for child in (w1, w2):
            assert f"pid {child.pid} [worker] {sys.executable} -c" in line
        assert "--name NAME --all" in ambiguous.stderr
        install(samples["v2"], moddir / "sample.so")
        both = nr("reload", "sample", "--name", "worker", "--all", runtime=runtime_dir)
        assert both.returncode == 0, both.stderr
        assert both.stdout.count("[worker]: reloaded 'sample' generation 1 \u2192 2") == 2
        assert api.calls()["generation"] == 1 and w1.calls()["version"] == 2
        # Without a target, several processes: the error lists all three.
        everyone = nr("status", runtime=runtime_dir)
        assert everyone.returncode == 1 and "3 processes are serving" in everyone.stderr
        assert f"pid {api.pid} [api]" in everyone.stderr
        unknown = nr("status", "--name", "nobody", runtime=runtime_dir)
        assert unknown.returncode == 1 and "no live process is named 'nobody'" in unknown.stderr

        ps = nr("ps", runtime=runtime_dir)
        assert ps.returncode == 0, ps.stderr
        lines = ps.stdout.splitlines()
        assert lines[0].split() == ["PID", "NAME", "MODULES", "COMMAND"]
        rows = {int(line.split()[0]): line.split(None, 3) for line in lines[1:]}
        assert rows[api.pid][1:3] == ["api", "sample@1"] and rows[w2.pid][1:3] == ["worker", "sample@2"]
        assert rows[api.pid][3].startswith(f"{sys.executable} -c")
        as_json = json.loads(nr("ps", "--json", runtime=runtime_dir).stdout)
        assert [(e["pid"], e["name"]) for e in as_json] == sorted((c.pid, n) for c, n in
                                                                 zip(children, ("api", "worker", "worker")))
        assert all(e["ok"] and e["modules"][0]["name"] == "sample" for e in as_json)
    finally:
        for child in children:
            child.stop()


def test_serve_name_is_checked_and_defaults_to_the_program(runtime_dir):
    from nativereload import Registry, control

    with Registry() as reg:
        with pytest.raises(ValueError, match="invalid process name"):
            reg.serve(name="no spaces")
        server = reg.serve(name="api-1")
        assert server.name == "api-1" and control.request(server.path, "ping")["name"] == "api-1"
    assert control.server.program_name() == Path(sys.argv[0]).name.removesuffix(".py") or "python"
