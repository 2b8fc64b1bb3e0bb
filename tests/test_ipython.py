"""The %%nativereload cell magic, in a real IPython InteractiveShell."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

pytest.importorskip("IPython")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from nativereload.ipython import CellError  # noqa: E402

CELL_V1 = """\
long add(long a, long b) { return a + b; }
static long helper(void) { return 0; }
"""

CELL_V2 = """\
long add(long a, long b) { return a + b + 100; }
int version(void) { return 2; }
"""


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A fresh InteractiveShell with the extension loaded; its cell builds cached under tmp_path."""
    (tmp_path / "cache").mkdir()       # IPython uses XDG_CACHE_HOME only if it exists
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    InteractiveShell.clear_instance()
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"      # no history database left to write at exit
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "nativereload")
    yield ip
    ip.run_line_magic("unload_ext", "nativereload")
    InteractiveShell.clear_instance()


def run(ip: InteractiveShell, name_and_options: str, cell: str):
    result = ip.run_cell(f"%%nativereload {name_and_options}\n{cell}")
    return result


def builds(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "ipython" / "nativereload").iterdir())


def test_importing_nativereload_does_not_import_ipython():
    code = "import nativereload, sys; print('IPython' in sys.modules, hasattr(nativereload, 'load_ipython_extension'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_a_cell_becomes_a_module_in_the_namespace(shell, tmp_path, capsys):
    result = run(shell, "counter", CELL_V1)
    assert result.success, result.error_in_exec
    counter = shell.user_ns["counter"]
    assert counter.add(2, 3) == 5
    assert "loaded 'counter' generation 1: add" in capsys.readouterr().out
    # Static functions are not declared (the library does not export them).
    with pytest.raises(AttributeError):
        counter.helper
    # Cached by content: running the same cell again compiles nothing and makes no new build.
    (build,) = builds(tmp_path)
    so = tmp_path / "cache" / "ipython" / "nativereload" / build / "counter.so"
    inode = so.stat().st_ino
    assert run(shell, "counter", CELL_V1).success
    assert builds(tmp_path) == [build] and so.stat().st_ino == inode
    assert shell.user_ns["counter"] is counter and counter.generation == 2


@pytest.mark.timeout(120)
def test_rerun_reloads_while_a_background_thread_calls(shell, capsys):
    assert run(shell, "counter", CELL_V1).success
    add = shell.user_ns["counter"].add            # a function taken before the re-run
    results, errors, stop = set(), [], threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                results.add(add(1, 2))
            except Exception as exc:     # exactly what must never happen
                errors.append(repr(exc))

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while 3 not in results:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = run(shell, "counter", CELL_V2)
        assert result.success, result.error_in_exec
        deadline = time.monotonic() + 10
        while 103 not in results:
            assert time.monotonic() < deadline, results
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert results == {3, 103}
    counter = shell.user_ns["counter"]
    assert counter.generation == 2 and add(1, 2) == 103 and counter.version() == 2
    assert "reloaded 'counter' generation 1 -> 2" in capsys.readouterr().out
    assert counter is not None and shell.user_ns["counter"] is counter


def test_a_compile_error_shows_the_compilers_lines_and_the_old_version_serves(shell, capsys):
    assert run(shell, "counter", CELL_V1).success
    capsys.readouterr()
    result = run(shell, "counter", "long add(long a, long b)\n{\n    return nope;\n}\n")
    assert not result.success and isinstance(result.error_in_exec, CellError)
    captured = capsys.readouterr()
    assert "counter.c:3:12: error:" in captured.err and "nope" in captured.err
    rendered = "\n".join(result.error_in_exec._render_traceback_())
    assert rendered.startswith("error: module 'counter': the cell did not compile")
    assert "generation 1 keeps serving" in rendered and "hint: fix the cell" in rendered
    assert "Traceback" not in captured.out + captured.err
    assert shell.user_ns["counter"].add(2, 3) == 5


def test_a_refused_reload_keeps_the_old_version(shell):
    assert run(shell, "counter", CELL_V1).success
    result = run(shell, "counter", "extern long nowhere(void);\nlong add(long a, long b) { return nowhere(); }\n")
    assert not result.success
    assert "LoadError" in str(result.error_in_exec) and "generation 1 keeps serving" in str(result.error_in_exec)
    counter = shell.user_ns["counter"]
    assert counter.add(2, 3) == 5 and counter.generation == 1
    # The next good cell reloads as usual.
    assert run(shell, "counter", CELL_V2).success and counter.add(2, 3) == 105


def test_options_and_the_status_line_magic(shell, tmp_path, capsys):
    include = tmp_path / "inc"
    include.mkdir()
    (include / "scale.h").write_text("#define SCALE 10\n")
    cell = ('#include <math.h>\n#include "scale.h"\n'
            "double root(double x) { return sqrt(x) * SCALE * FACTOR; }\n")
    result = run(shell, f"geo -I {include} -D FACTOR=2 -l m --cflags=-O0", cell)
    assert result.success, result.error_in_exec
    assert shell.user_ns["geo"].root(16.0) == 80.0
    assert run(shell, "counter", CELL_V1).success
    capsys.readouterr()
    shell.run_line_magic("nativereload", "")
    status = capsys.readouterr().out
    assert "counter: generation 1; images: g1 active; functions: add" in status
    assert "geo: generation 1" in status and "functions: root" in status


def test_cells_that_cannot_be_modules(shell):
    result = run(shell, "counter", "static long add(long a, long b) { return a + b; }\n")
    assert not result.success and "defines no function" in str(result.error_in_exec)
    result = shell.run_cell("%%nativereload\nlong add(long a, long b) { return a + b; }\n")
    assert not result.success and "needs a module name" in str(result.error_in_exec)
    result = run(shell, "not-a-name", CELL_V1)
    assert not result.success and "Python identifier" in str(result.error_in_exec)
    # An explicit cdef replaces the derived one.
    result = run(shell, "counter --cdef 'long add(long, long);'", CELL_V2)
    assert result.success and shell.user_ns["counter"].add(1, 1) == 102
    with pytest.raises(AttributeError):
        shell.user_ns["counter"].version


def test_the_readme_cells(shell):
    from test_readme import blocks

    found = blocks("In a notebook: the cell magic")
    assert [lang for lang, _ in found] == ["python", "c"]
    shell.run_line_magic("unload_ext", "nativereload")     # the README loads it itself
    for _lang, body in found:
        result = shell.run_cell(body)
        assert result.success, result.error_in_exec
    assert shell.user_ns["counter"].add(2, 3) == 5


def test_a_rerun_that_changes_a_signature_is_accepted_and_said(shell, capsys):
    assert run(shell, "counter", CELL_V2).success
    counter = shell.user_ns["counter"]
    assert counter.version() == 2
    assert run(shell, "counter", "double version(void) { return 2.5; }\n").success
    out = capsys.readouterr().out
    assert "interface changed: 1 changed, 1 removed (incompatible)" in out
    assert counter.version() == 2.5 and counter.generation == 2
