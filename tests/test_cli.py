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


def nr(*args: str, runtime: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real command (``python -m nativereload``) as a subprocess."""
    return subprocess.run([sys.executable, "-m", "nativereload", *args], capture_output=True, text=True,
                          env=child_env(runtime), timeout=timeout, stdin=subprocess.DEVNULL)


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
    assert cli.main(["watch", "--source-dir", str(tmp_path / "missing"), "--build-dir", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err.startswith(f"error: source directory {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "b").exists()


def test_status_table_says_what_became_of_old_images():
    def module(generation, *images):
        return {"name": "m", "path": "/x/m.so", "generation": generation,
                "images": [{"generation": g, "state": s, "in_flight": n} for g, s, n in images]}

    def table(*modules):
        return cli.format_status({"ok": True, "pid": 7, "modules": list(modules)}, "/s")

    assert "drained" not in table(module(1, (1, "active", 0)))
    assert "  m: old image drained (generation 1)" in table(module(2, (2, "active", 0)))
    assert "  m: old images drained (generations 1-3)" in table(module(4, (4, "active", 0)))
    assert "  m: draining: generation 2 (3 call(s) in flight); old image drained (generation 1)" in table(
        module(3, (2, "retired", 3), (3, "active", 1)))
    # Unloaded: nothing active, the last image still draining.
    assert "  m: draining: generation 2 (1 call(s) in flight); old image drained (generation 1)" in table(
        module(2, (2, "retired", 1)))


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
    assert f"pid {child.pid}: reloaded 'sample' generation 1 \u2192 2 in " in reload.stdout
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
    assert error.startswith(f"error: pid {child.pid}: reload of 'nosuch' failed: ModuleNotLoaded")
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
    assert f"pid {first.pid}: unloaded 'sample'" in unload.stdout
    table = nr("status", "--all", runtime=runtime_dir)
    assert table.returncode == 0
    blocks = table.stdout.split("\n\n")
    assert len(blocks) == 2
    by_pid = {int(block.split()[1]): block for block in blocks}
    assert "sample" in by_pid[second.pid] and "active" in by_pid[second.pid]
    assert "active" not in by_pid[first.pid]
    again = nr("unload", "sample", "--pid", str(first.pid), runtime=runtime_dir)
    assert again.returncode == 1 and "ModuleNotLoaded" in again.stderr
