"""`nativereload demo` runs to completion: from the checkout, and from a plain `pip install .`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def check_report(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"calls served: +[1-9]\d*", out), out
    assert re.search(r"calls failed: +0\n", out), out
    assert re.search(r"generation: +2\n", out), out
    assert "old image drained: yes" in out
    assert "started on version 1, finished on version 1" in out
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_demo_runs_to_completion(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "nativereload", "demo"], capture_output=True, text=True,
                            env=env, timeout=100, cwd=tmp_path, stdin=subprocess.DEVNULL)
    check_report(result)
    # It cleans up after itself: no build directory, no registry directory left.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_demo_without_cmake_uses_cc(tmp_path):
    """No cmake on PATH: the demo compiles with cc."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cc").symlink_to(cc)
    for tool in ("as", "ld"):  # what cc itself runs
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=str(bin_dir), TMPDIR=str(tmp_path))
    env.pop("CC", None)
    result = subprocess.run([sys.executable, "-m", "nativereload", "demo", "--seconds", "0.5"],
                            capture_output=True, text=True, env=env, timeout=100, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    check_report(result)
    assert "with cc" in result.stdout


@pytest.mark.timeout(120)
def test_demo_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "nativereload", "demo", "--json", "--seconds", "0.3",
                             "--threads", "2"], capture_output=True, text=True, env=env, timeout=100, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["calls_failed"] == 0 and report["calls_served"] > 0
    assert report["generation"] == 2 and report["old_image_drained"] is True
    assert "calls failed: 0" in result.stderr


@pytest.mark.timeout(300)
def test_demo_from_a_plain_install(tmp_path):
    """The C source and the CMake helper ship inside the package: install, leave the checkout, run the demo."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=280,
                             env=dict(os.environ, PIP_NO_INPUT="1"))
    if install.returncode != 0:
        pytest.skip(f"pip install not possible here: {install.stderr[-500:]}")
    assert (target / "nativereload" / "data" / "demo.c").is_file()
    assert (target / "nativereload" / "cmake" / "nativereloadConfig.cmake").is_file()
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), TMPDIR=str(run_dir))
    result = subprocess.run([sys.executable, "-m", "nativereload", "demo", "--seconds", "0.5"], capture_output=True,
                            text=True, env=env, timeout=100, cwd=run_dir, stdin=subprocess.DEVNULL)
    check_report(result)
    cmake_dir = subprocess.run([sys.executable, "-m", "nativereload", "--cmake-dir"], capture_output=True, text=True,
                               env=env, cwd=run_dir, timeout=60)
    assert cmake_dir.stdout.strip() == str(target / "nativereload" / "cmake")
