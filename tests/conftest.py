"""Shared fixtures: the sample modules, compiled once per session with CMake.

``samples`` maps a build name to a compiled .so file:
    v1, v2          csrc/samples/sample.c with SAMPLE_VERSION 1 and 2
    v3              the same with SAMPLE_VERSION 3
    nosym           v2 without scaled()
    undef           v2 calling a function no library defines (dlopen fails)
    unique          a C++ library glibc keeps mapped after dlclose
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_CDEF = """
int version(void);
const char *version_string(void);
long add(long, long);
long scaled(long);
long counter_next(void);
double dot4(double, double, double, double);
long sum_bytes(const char *, long);
int wait_fd(int);
"""


def cmake_build(source: Path, build: Path, *defines: str) -> Path:
    """Configure (once) and build the project at ``source`` into ``build``; return ``build/modules``."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    *defines], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build)], check=True, stdout=subprocess.DEVNULL)
    return build / "modules"


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    # NATIVERELOAD_SAMPLES_CACHE=DIR: build once into DIR and reuse it in later
    # sessions (tools/mutate.py runs the tests hundreds of times).
    cache = os.environ.get("NATIVERELOAD_SAMPLES_CACHE")
    if cache:
        final = Path(cache) / "samples"
        if not (final / "complete").exists():
            partial = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
            build_samples(partial)
            (partial / "complete").touch()
            try:
                os.rename(partial, final)
            except OSError:              # another session finished first: use its build
                shutil.rmtree(partial, ignore_errors=True)
        return build_samples(final, build=False)
    return build_samples(tmp_path_factory.mktemp("samples"))


def build_samples(base: Path, build: bool = True) -> dict[str, Path]:
    """Build (or, with ``build=False``, just name) the sample libraries under ``base``."""
    built = {}
    for version in (1, 2, 3):
        variants = "ON" if version == 2 else "OFF"
        modules = base / f"v{version}" / "modules"
        if build:
            cmake_build(ROOT, base / f"v{version}", f"-DSAMPLE_VERSION={version}",
                        f"-DNATIVERELOAD_SAMPLE_VARIANTS={variants}")
        built[f"v{version}"] = modules / "sample.so"
        if version == 2:
            built["nosym"] = modules / "sample_nosym.so"
            built["undef"] = modules / "sample_undef.so"
            built["unique"] = modules / "unique.so"
    for path in built.values():
        assert path.is_file(), path
    return built


def install(source: Path, target: Path) -> Path:
    """Put ``source`` at ``target`` the safe way: write a temporary file, then rename over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


@pytest.fixture
def moddir(tmp_path) -> Path:
    """An empty module directory for one test."""
    path = tmp_path / "modules"
    path.mkdir()
    return path


@pytest.fixture
def short_tmp_path() -> Path:
    """A fresh directory with a short name (/tmp/nrt-XXXXXXXX), removed afterwards.

    For Unix sockets: a socket path has at most 107 bytes, and pytest's
    tmp_path (/tmp/pytest-of-USER/pytest-N/<test name>N/) can use most of them.
    """
    path = Path(tempfile.mkdtemp(prefix="nrt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmpdir_for_copies(tmp_path) -> Path:
    """A private tmpdir for a registry's copies, so a test can see exactly what it left."""
    path = tmp_path / "copies"
    path.mkdir()
    return path


@pytest.fixture
def reg(moddir, tmpdir_for_copies, gate_impl):
    """A Registry searching ``moddir``, copying into ``tmpdir_for_copies``, once per gate implementation."""
    from nativereload import Registry

    registry = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    yield registry
    registry.close(timeout=10)


@pytest.fixture(params=["python", "c"])
def gate_impl(request, monkeypatch):
    """Run a test once per gate implementation (the C one only where it is built)."""
    from nativereload import gate

    if request.param == "c":
        if gate.C is None:
            pytest.skip("C gate not built in this environment")
        monkeypatch.delenv("NATIVERELOAD_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("NATIVERELOAD_PURE_PYTHON", "1")
    return request.param


def private_copies(tmpdir: Path) -> list[str]:
    """Every file a registry left under ``tmpdir`` other than its directories' lock files, sorted."""
    return sorted(str(path) for path in Path(tmpdir).rglob("*") if path.is_file() and path.name != ".lock")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def mapped_paths() -> set[str]:
    """The files mapped into this process (from /proc/self/maps), " (deleted)" suffixes removed."""
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
    return paths


def run_python(code: str, *, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for scenarios that may crash the process)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=full_env)
