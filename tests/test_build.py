"""`nativereload build`: real CMake builds of the project's own CMakeLists.txt and of small user projects."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

from nativereload import build, cli

pytestmark = pytest.mark.timeout(300)

USER_PROJECT = """
cmake_minimum_required(VERSION 3.16)
project(userproj C)
find_package(nativereload REQUIRED)
nativereload_add_module(counter SOURCES counter.c)
nativereload_add_module(other SOURCES other.c OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/elsewhere)
"""


def user_project(path: Path, counter: str = "int step(void) { return 1; }\n") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "CMakeLists.txt").write_text(USER_PROJECT)
    (path / "counter.c").write_text(counter)
    (path / "other.c").write_text("int other(void) { return 7; }\n")
    return path


def test_build_the_projects_own_cmakelists(tmp_path, capsys):
    build_dir = tmp_path / "build"
    assert cli.main(["build", "--source-dir", str(ROOT), "--build-dir", str(build_dir)]) == 0
    out = capsys.readouterr().out
    sample = build_dir / "modules" / "sample.so"
    assert f"built sample: {sample}\n" in out
    assert sample.is_file()
    assert not list((build_dir / "modules").glob("*.partial"))

    # Incremental: nothing changed, nothing rebuilt.
    assert cli.main(["build", "--source-dir", str(ROOT), "--build-dir", str(build_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["built"] == [] and doc["configured"] is False
    assert {"name": "sample", "path": str(sample)} in doc["modules"]


def test_user_project_with_find_package(tmp_path):
    project = user_project(tmp_path / "proj")
    log = io.StringIO()
    result = build.build(project, project / "build", output=log)
    assert result.configured
    built = {m.name: m.path for m in result.built}
    assert built == {"counter": project / "build" / "modules" / "counter.so",
                     "other": project / "build" / "elsewhere" / "other.so"}

    (project / "counter.c").write_text("int step(void) { return 2; }\n")
    result = build.build(project, project / "build", output=log)
    assert [m.name for m in result.built] == ["counter"]
    assert not result.configured

    result = build.build(project, project / "build", target="other", output=log)
    assert result.built == ()

    # The library was built with the reload flags: position independent, -Bsymbolic.
    dynamic = subprocess.run(["readelf", "-d", str(built["counter"])], capture_output=True, text=True)
    if dynamic.returncode == 0:
        assert "SYMBOLIC" in dynamic.stdout


def test_compiler_errors_shown_as_written_and_exit_1(tmp_path):
    project = user_project(tmp_path / "proj", counter="int step(void) { return undeclared_thing; }\n")
    result = subprocess.run([sys.executable, "-m", "nativereload", "build", "--source-dir", str(project),
                             "--build-dir", str(project / "build")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "undeclared_thing" in result.stderr  # the compiler's own words
    assert "error: build failed" in result.stderr
    assert "\nhint: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_cmakelists(tmp_path, capsys):
    assert cli.main(["build", "--source-dir", str(tmp_path), "--build-dir", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no CMakeLists.txt in {tmp_path}") and "hint:" in err


def test_changing_config_reconfigures(tmp_path):
    project = user_project(tmp_path / "proj")
    log = io.StringIO()
    build.build(project, project / "build", config="Debug", output=log)
    result = build.build(project, project / "build", config="Release", output=log)
    assert result.configured
    cache = (project / "build" / "CMakeCache.txt").read_text()
    assert "CMAKE_BUILD_TYPE:STRING=Release" in cache


def test_helper_rewrites_manifest_on_reconfigure(tmp_path):
    project = user_project(tmp_path / "proj")
    log = io.StringIO()
    build.build(project, project / "build", output=log)
    (project / "CMakeLists.txt").write_text(textwrap.dedent(USER_PROJECT).replace(
        "nativereload_add_module(other SOURCES other.c OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/elsewhere)\n", ""))
    result = build.build(project, project / "build", output=log)
    assert [m.name for m in result.modules] == ["counter"]


def test_unusable_directories_fail_without_traceback(tmp_path, capsys):
    project = user_project(tmp_path / "proj")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cases = {
        ("--source-dir", str(tmp_path / "missing")): f"error: source directory {tmp_path / 'missing'} does not exist",
        ("--source-dir", str(project), "--build-dir", str(not_a_dir)): f"error: the build directory {not_a_dir} "
                                                                       "is not a directory",
        ("--source-dir", str(project), "--build-dir", str(not_a_dir / "b")): "error: cannot create the build "
                                                                             f"directory {not_a_dir / 'b'}",
    }
    for argv, message in cases.items():
        assert cli.main(["build", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and "\nhint: " in err


def test_build_dir_of_another_project_is_refused(tmp_path, capsys):
    project = user_project(tmp_path / "proj")
    other = tmp_path / "other-build"
    other.mkdir()
    (other / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={tmp_path / 'elsewhere'}\n"
                                          "CMAKE_BUILD_TYPE:STRING=RelWithDebInfo\n")
    assert cli.main(["build", "--source-dir", str(project), "--build-dir", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other} was configured for another project ({tmp_path / 'elsewhere'})")


def test_cxx_module_has_the_reload_flags(tmp_path):
    """-fPIC, -Wl,-Bsymbolic and (GCC) -fno-gnu-unique: no STB_GNU_UNIQUE symbol keeps the image mapped."""
    if not shutil.which("readelf"):
        pytest.skip("readelf not installed")
    project = tmp_path / "cxx"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(textwrap.dedent("""
        cmake_minimum_required(VERSION 3.16)
        project(cxx CXX)
        find_package(nativereload REQUIRED)
        nativereload_add_module(unique SOURCES unique.cpp)
    """))
    # An inline function's static: g++ makes it STB_GNU_UNIQUE unless told not to.
    (project / "unique.cpp").write_text('inline int &count() { static int n; return n; }\n'
                                        'extern "C" int bump() { return ++count(); }\n')
    result = build.build(project, project / "build", output=io.StringIO())
    (module,) = result.built
    symbols = subprocess.run(["readelf", "-sW", str(module.path)], capture_output=True, text=True, check=True)
    assert "UNIQUE" not in symbols.stdout
    dynamic = subprocess.run(["readelf", "-d", str(module.path)], capture_output=True, text=True, check=True)
    assert "SYMBOLIC" in dynamic.stdout
    text = (build.cmake_dir() / "nativereloadConfig.cmake").read_text()
    assert "-fPIC" in text and "-Wl,-Bsymbolic" in text and "-fno-gnu-unique" in text
