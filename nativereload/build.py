"""CMake configure and build: sources -> the module files a registry loads.

``build(source_dir, build_dir)`` configures the project on first use (Ninja
when it is installed, the CMake helper from ``cmake_dir()`` made findable with
``find_package(nativereload)``), then builds incrementally, and reports which
module files the build changed. The compiler's output is passed through as
the compiler wrote it, to the stream given (the CLI's stderr), never parsed.

Which files are modules: the ones ``nativereload_add_module()`` recorded in
``<build>/nativereload-modules/NAME.path``; for a project that does not use
the helper, the ``*.so`` files in ``<build>/modules``. A module counts as
built when its file changed (inode, size or mtime) during this build: the
helper renames a finished file over the old one, so a changed file is always
a complete one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from .errors import BuildError

__all__ = ["BuildError", "BuildResult", "Module", "build", "cmake_dir", "file_signature", "module_files"]

logger = logging.getLogger(__name__)

MANIFEST_DIR = "nativereload-modules"




@dataclasses.dataclass(frozen=True)
class Module:
    """One module file a build produces: its CMake target name and final path."""

    name: str
    path: Path


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What one ``build()`` did.

    Attributes:
        modules: every module file the project produces (that exists after the build).
        built: the subset whose file changed during this build.
        configured: whether this build ran the CMake configure step.
        seconds: wall time of configure + build.
    """

    modules: tuple[Module, ...]
    built: tuple[Module, ...]
    configured: bool
    seconds: float


def cmake_dir() -> Path:
    """The directory holding ``nativereloadConfig.cmake`` (``nativereload --cmake-dir``)."""
    return Path(__file__).resolve().parent / "cmake"


def module_files(build_dir: str | os.PathLike) -> list[Module]:
    """The module files of a configured build directory, existing or not yet built."""
    build_dir = Path(build_dir)
    manifest = build_dir / MANIFEST_DIR
    if manifest.is_dir():
        found = []
        for entry in sorted(manifest.glob("*.path")):
            text = entry.read_text(encoding="utf-8").strip()
            if text:
                found.append(Module(entry.name[: -len(".path")], Path(text)))
        return found
    # A project that builds its libraries without the helper: the conventional place.
    return [Module(p.name[: -len(".so")], p) for p in sorted((build_dir / "modules").glob("*.so"))]


def file_signature(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of ``path``, or None if it cannot be stat'ed: changes when the file does."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _cache_entry(build_dir: Path, name: str) -> str | None:
    """The value of ``name`` in ``build_dir``'s CMakeCache.txt (None: no cache, or no such entry)."""
    try:
        lines = (build_dir / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BuildError(f"cannot read {build_dir / 'CMakeCache.txt'}: {exc.strerror or exc}",
                         hint="pass a --build-dir you can read and write") from None
    for line in lines:
        if line.startswith(name + ":"):
            return line.partition("=")[2]
    return None


def _prepare_build_dir(source_dir: Path, build_dir: Path) -> None:
    """Check the directories before CMake runs, so the failure names its cause."""
    if not source_dir.is_dir():
        raise BuildError(f"source directory {source_dir} does not exist",
                         hint="run from your project's directory or pass --source-dir")
    if build_dir.exists() and not build_dir.is_dir():
        raise BuildError(f"the build directory {build_dir} is not a directory", hint="pass another --build-dir")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the build directory {build_dir}: {exc.strerror or exc}",
                         hint="pass a --build-dir you can write") from None
    if not os.access(build_dir, os.W_OK | os.X_OK):
        raise BuildError(f"the build directory {build_dir} is not writable", hint="pass a --build-dir you can write")
    home = _cache_entry(build_dir, "CMAKE_HOME_DIRECTORY")
    if home is not None and Path(home).resolve() != source_dir:
        raise BuildError(f"{build_dir} was configured for another project ({home}), not {source_dir}",
                         hint="pass --build-dir for a directory of its own, or remove that one")


def _run(cmd: list[str], output: IO[str] | None, what: str) -> None:
    logger.debug("running %s", " ".join(cmd))
    output = output if output is not None else sys.stderr
    try:
        output.flush()
    except (AttributeError, ValueError):
        pass
    try:
        # Inherit the stream's descriptor so the compiler writes straight to it
        # (colours and line buffering as the user expects from a terminal).
        fileno = output.fileno()
        proc = subprocess.run(cmd, stdout=fileno, stderr=fileno, stdin=subprocess.DEVNULL)
    except (AttributeError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise BuildError(f"cannot run {cmd[0]!r}: not found", hint="install CMake (apt-get install cmake, "
                             "or pip install cmake) and make sure it is on PATH") from None
        # A stream without a descriptor (StringIO in a test): capture, then copy.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              text=True, errors="replace")
        output.write(proc.stdout)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit status {proc.returncode}); see the output above",
                         returncode=proc.returncode,
                         hint="fix the error the compiler or CMake reported, then build again")


def build(source_dir: str | os.PathLike = ".", build_dir: str | os.PathLike = "build", *,
          target: str | None = None, config: str = "RelWithDebInfo", output: IO[str] | None = None,
          jobs: int | None = None) -> BuildResult:
    """Configure ``source_dir`` into ``build_dir`` if needed, build, and report what changed.

    Configure runs when the build directory has no CMakeCache.txt yet, or when
    ``config`` differs from the cached CMAKE_BUILD_TYPE; afterwards ``cmake
    --build`` re-runs it by itself whenever a CMakeLists.txt changes.

    Args:
        target: build only this CMake target (default: all).
        config: CMAKE_BUILD_TYPE (and ``--config`` for multi-config generators).
        output: where CMake and the compiler write (default: sys.stderr).

    Raises:
        BuildError: CMake missing, no source directory or CMakeLists.txt, a build
            directory that cannot be written or belongs to another project,
            configure or build failed.
    """
    source_dir = Path(source_dir).resolve()
    build_dir = Path(build_dir).resolve()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake is not installed", hint="install CMake (apt-get install cmake, or pip install "
                         "cmake) and make sure it is on PATH")
    started = time.perf_counter()
    configured = False
    _prepare_build_dir(source_dir, build_dir)
    cached_type = _cache_entry(build_dir, "CMAKE_BUILD_TYPE")
    if cached_type is None or cached_type != config:
        if not (source_dir / "CMakeLists.txt").is_file():
            raise BuildError(f"no CMakeLists.txt in {source_dir}",
                             hint="run from your project's directory or pass --source-dir")
        # nativereload_DIR lets the project find_package(nativereload); a project
        # that include()s the helper directly does not use it, hence no warning.
        # NATIVERELOAD_PYTHON: the interpreter that embeds INTERFACE headers is this one.
        cmd = [cmake, "-S", str(source_dir), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={config}",
               f"-Dnativereload_DIR={cmake_dir()}", f"-DNATIVERELOAD_PYTHON={sys.executable}",
               "--no-warn-unused-cli"]
        # The generator can only be chosen when the build directory is new.
        if cached_type is None and shutil.which("ninja"):
            cmd[1:1] = ["-G", "Ninja"]
        _run(cmd, output, "CMake configure")
        configured = True

    before = {m.path: file_signature(m.path) for m in module_files(build_dir)}
    cmd = [cmake, "--build", str(build_dir), "--config", config]
    if target:
        cmd += ["--target", target]
    if jobs:
        cmd += ["--parallel", str(jobs)]
    _run(cmd, output, "build")

    modules = tuple(m for m in module_files(build_dir) if m.path.exists())
    built = tuple(m for m in modules if file_signature(m.path) != before.get(m.path))
    seconds = time.perf_counter() - started
    logger.info("built %d module(s) in %.1f s: %s", len(built), seconds,
                ", ".join(m.name for m in built) or "all up to date")
    return BuildResult(modules=modules, built=built, configured=configured, seconds=seconds)
