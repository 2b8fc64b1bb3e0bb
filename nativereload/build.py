"""Building modules: sources -> the module files a registry loads.

Two ways, one result (``BuildResult``: which module files exist, which this
build changed):

``build(source_dir, build_dir)`` builds a CMake project: it configures on
first use (Ninja when it is installed, the CMake helper from ``cmake_dir()``
made findable with ``find_package(nativereload)``), then builds
incrementally. Which files are modules: the ones ``nativereload_add_module()``
recorded in ``<build>/nativereload-modules/NAME.path``; for a project that
does not use the helper, the ``*.so`` files in ``<build>/modules``.

``compile_sources(files, output_dir)`` builds one module from C (or C++)
files with no project at all (``nativereload build FILE.c``), with the flags
the CMake helper uses, and skips the work when neither the sources, the
headers they include, nor the flags changed.

Either way the module file is written by rename, so a changed file is
always a complete one, and the compiler's output is passed through as the
compiler wrote it, to the stream given (the CLI's stderr), never parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Mapping

from .errors import BuildError

__all__ = ["BuildError", "BuildResult", "Module", "build", "cmake_dir", "compile_sources", "file_signature",
           "module_files"]

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
    """Check the directories before CMake runs, so the failure names its cause (and leaves nothing behind)."""
    if not source_dir.is_dir():
        raise BuildError(f"source directory {source_dir} does not exist",
                         hint="run from your project's directory or pass --source-dir")
    if build_dir.exists() and not build_dir.is_dir():
        raise BuildError(f"the build directory {build_dir} is not a directory", hint="pass another --build-dir")
    if not (source_dir / "CMakeLists.txt").is_file() and not (build_dir / "CMakeCache.txt").is_file():
        raise BuildError(f"no CMakeLists.txt in {source_dir}",
                         hint="run from your project's directory or pass --source-dir; or build C files without "
                              "a project: nativereload build FILE.c")
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


def _run(cmd: list[str], output: IO[str] | None, what: str, cwd: Path | None = None) -> None:
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
        proc = subprocess.run(cmd, stdout=fileno, stderr=fileno, stdin=subprocess.DEVNULL, cwd=cwd)
    except (AttributeError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise BuildError(f"cannot run {cmd[0]!r}: not found", hint="install CMake (apt-get install cmake, "
                             "or pip install cmake) and make sure it is on PATH") from None
        # A stream without a descriptor (StringIO in a test): capture, then copy.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                              text=True, errors="replace")
        output.write(proc.stdout)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit status {proc.returncode}); see the output above",
                         returncode=proc.returncode,
                         hint="fix the error the compiler or CMake reported, then build again")


def build(source_dir: str | os.PathLike = ".", build_dir: str | os.PathLike = "build", *,
          target: str | None = None, config: str = "RelWithDebInfo", output: IO[str] | None = None,
          jobs: int | None = None, definitions: Mapping[str, object] | None = None) -> BuildResult:
    """Configure ``source_dir`` into ``build_dir`` if needed, build, and report what changed.

    Configure runs when the build directory has no CMakeCache.txt yet, or when
    ``config`` differs from the cached CMAKE_BUILD_TYPE; afterwards ``cmake
    --build`` re-runs it by itself whenever a CMakeLists.txt changes.

    Args:
        target: build only this CMake target (default: all).
        config: CMAKE_BUILD_TYPE (and ``--config`` for multi-config generators).
        output: where CMake and the compiler write (default: sys.stderr).
        definitions: CMake cache variables (``-DNAME=VALUE``), set by a
            configure step that then runs even if the directory is configured.

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
    if cached_type is None or cached_type != config or definitions:
        if not (source_dir / "CMakeLists.txt").is_file():
            raise BuildError(f"no CMakeLists.txt in {source_dir}",
                             hint="run from your project's directory or pass --source-dir; or build C files "
                                  "without a project: nativereload build FILE.c")
        # nativereload_DIR lets the project find_package(nativereload); a project
        # that include()s the helper directly does not use it, hence no warning.
        # NATIVERELOAD_PYTHON: the interpreter that embeds INTERFACE headers is this one.
        cmd = [cmake, "-S", str(source_dir), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={config}",
               f"-Dnativereload_DIR={cmake_dir()}", f"-DNATIVERELOAD_PYTHON={sys.executable}",
               "--no-warn-unused-cli", *(f"-D{k}={v}" for k, v in (definitions or {}).items())]
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


# --------------------------------------------------------------------------- C files, no project

_CXX_SUFFIXES = {".cc", ".cpp", ".cxx", ".c++", ".C"}
_STAMPS = ".nativereload-build"
# The flags nativereload_add_module() gives (cmake/nativereloadConfig.cmake
# says why each): position-independent, own calls bound inside the library.
_CFLAGS = ["-fPIC", "-O2", "-g"]
_LDFLAGS = ["-shared", "-Wl,-Bsymbolic"]


def find_compiler(cxx: bool = False) -> list[str] | None:
    """The compiler command: $CC ($CXX for C++), split as a shell would, else cc, gcc or clang (c++, g++,
    clang++) on PATH; None if none is found. The command in $CC is taken as it is, not looked up."""
    configured = os.environ.get("CXX" if cxx else "CC")
    if configured:
        return shlex.split(configured)
    for candidate in (("c++", "g++", "clang++") if cxx else ("cc", "gcc", "clang")):
        found = shutil.which(candidate)
        if found:
            return [found]
    return None


def _compiler(cxx: bool) -> list[str]:
    found = find_compiler(cxx)
    if found:
        return found
    variable = "CXX" if cxx else "CC"
    raise BuildError(f"no {'C++' if cxx else 'C'} compiler found (set {variable}, or install one: "
                     "apt-get install gcc)", hint=f"set {variable} to your compiler, e.g. {variable}=gcc")


def _is_gcc(compiler: list[str]) -> bool:
    try:
        out = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and ("gcc" in out.lower() or "free software foundation" in out.lower())


def _define_flags(defines: Mapping[str, object] | Iterable[str]) -> list[str]:
    if isinstance(defines, Mapping):
        return [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in defines.items()]
    return [f"-D{d}" for d in defines]


def _depfile_inputs(depfile: Path) -> list[str]:
    """The files a Make-style dependency file (``cc -MD``) lists after its target."""
    try:
        text = depfile.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    text = text.replace("\\\n", " ")
    _, _, deps = text.partition(": ")
    # Spaces inside a path are escaped as "\ "; anything else separates.
    found, current, chars = [], [], iter(deps)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            if nxt in (" ", "#"):
                current.append(nxt)
                continue
            current.append(ch + nxt)
        elif ch.isspace():
            if current:
                found.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        found.append("".join(current))
    return found


def _stamp(commands: list[list[str]], inputs: Iterable[str]) -> dict:
    """What the next build compares with: the exact commands, and each input's (inode, size, mtime)."""
    return {"commands": commands, "inputs": {path: file_signature(path) for path in sorted(set(inputs))}}


def compile_sources(sources: Iterable[str | os.PathLike], output_dir: str | os.PathLike = "build/modules", *,
                    name: str | None = None, include_dirs: Iterable[str | os.PathLike] = (),
                    defines: Mapping[str, object] | Iterable[str] = (), libraries: Iterable[str] = (),
                    library_dirs: Iterable[str | os.PathLike] = (), cflags: Iterable[str] = (),
                    ldflags: Iterable[str] = (), output: IO[str] | None = None, force: bool = False,
                    cwd: str | os.PathLike | None = None,
                    interface: str | os.PathLike | None = None) -> BuildResult:
    """Compile C (or C++) files into ``output_dir/NAME.so``, with no build system; skip it if nothing changed.

    The flags are those of the CMake helper: ``-fPIC -O2 -g``, linked
    ``-shared -Wl,-Bsymbolic`` (and ``-fno-gnu-unique`` for C++ with GCC);
    ``cflags`` and ``ldflags`` come after them, so they can override. The
    compiler is ``$CC`` (``$CXX`` if a source is C++), else ``cc``. Objects
    and a record of the last build live in ``output_dir/.nativereload-build/``:
    the build is skipped when the module exists and neither the commands nor
    any source or included header changed since (``force`` rebuilds anyway).

    Args:
        name: the module name (default: the first source's stem).
        defines: ``{"NAME": value}`` (None for a bare ``-DNAME``), or ``["NAME=value", ...]``.
        libraries: names for ``-l``; ``library_dirs`` for ``-L``.
        output: where the compiler writes (default: sys.stderr).
        cwd: the directory relative paths are taken from, and the compiler
            runs in (default: the current one). The compiler is given each
            source relative to it, so its messages name ``counter.c:3:5``.
        interface: the module's header: its declarations are embedded in the
            module (as ``nativereload embed`` does), so it loads with no cdef
            and every reload is checked against them.

    Returns:
        a BuildResult with the one module, in ``built`` only if it was rebuilt.

    Raises:
        BuildError: no sources, a source missing, no compiler, or compiling or
            linking failed (the compiler's messages went to ``output``).
    """
    started = time.perf_counter()
    base = Path(cwd).absolute() if cwd is not None else Path.cwd()
    sources = [base / src for src in sources]
    if not sources:
        raise BuildError("no source files given", hint="nativereload build FILE.c [FILE.c ...]")
    for src in sources:
        if not src.is_file():
            raise BuildError(f"source file {src} does not exist", hint="check the path (relative to the current "
                             "directory)")
    name = name or sources[0].stem
    if not name or "/" in name or name.startswith("."):
        raise BuildError(f"invalid module name {name!r}", hint="pass --name NAME")
    output_dir = base / output_dir
    target = output_dir / f"{name}.so"
    stamps = output_dir / _STAMPS / name
    cxx = any(src.suffix in _CXX_SUFFIXES for src in sources)
    compiler = _compiler(cxx)
    cflags = [*_CFLAGS, *(["-fno-gnu-unique"] if cxx and _is_gcc(compiler) else []),
              *(f"-I{base / d}" for d in include_dirs), *_define_flags(defines), *cflags]
    if interface is not None:
        sources.append(_embed_interface(base / interface, stamps / f"{name}_interface.c",
                                        [base / d for d in include_dirs], _define_flags(defines)))
    objects, commands = [], []
    for i, src in enumerate(sources):
        obj = stamps / f"{i}-{src.stem}.o"
        objects.append(obj)
        given = os.path.relpath(src, base) if base in src.parents else str(src)
        commands.append([*compiler, *cflags, "-MD", "-MF", str(obj.with_suffix(".d")), "-c", given,
                         "-o", str(obj)])
    partial = output_dir / f".{name}.so.partial"
    link = [*compiler, *_LDFLAGS, *map(str, objects), "-o", str(partial),
            *(f"-L{base / d}" for d in library_dirs), *(f"-l{lib}" for lib in libraries), *ldflags]
    commands.append(link)

    record = stamps / "build.json"
    if not force and target.is_file():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if (isinstance(previous, dict) and previous.get("commands") == commands
                and isinstance(previous.get("inputs"), dict) and _same_inputs(previous["inputs"])):
            seconds = time.perf_counter() - started
            logger.info("module '%s' is up to date (%s)", name, target)
            return BuildResult(modules=(Module(name, target),), built=(), configured=False, seconds=seconds)
    try:
        stamps.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create {stamps}: {exc.strerror or exc}", hint="pass an output directory you "
                         "can write (-o DIR)") from None
    record.unlink(missing_ok=True)
    for src, command in zip(sources, commands):
        _run(command, output, f"compiling {src.name}", cwd=base)
    _run(link, output, f"linking {name}.so", cwd=base)
    os.replace(partial, target)        # complete, or not there at all
    inputs = [str(src) for src in sources]
    for obj in objects:
        inputs += [str(base / dep) for dep in _depfile_inputs(obj.with_suffix(".d"))]
    record.write_text(json.dumps(_stamp(commands, inputs)), encoding="utf-8")
    seconds = time.perf_counter() - started
    logger.info("built module '%s' in %.1f s: %s", name, seconds, target)
    module = Module(name, target)
    return BuildResult(modules=(module,), built=(module,), configured=False, seconds=seconds)


def _embed_interface(header: Path, output: Path, include_dirs: list[Path], define_flags: list[str]) -> Path:
    """Write the C file that embeds ``header``'s interface (only if its text changed: the build stays incremental).

    Raises:
        BuildError: the header is missing, or its declarations cannot be turned into an interface.
    """
    from . import cdefgen
    from .errors import InterfaceError

    if not header.is_file():
        raise BuildError(f"interface header {header} does not exist", hint="pass --interface HEADER, the header "
                         "the module's sources include")
    output.parent.mkdir(parents=True, exist_ok=True)
    fresh = output.with_name(output.name + ".new")
    try:
        cdefgen.embed_header(header, fresh, include_dirs, [flag[2:] for flag in define_flags])
    except InterfaceError as exc:
        raise BuildError(f"cannot embed the interface of {header}: {exc}",
                         hint="hide what cffi cannot parse behind #ifndef NATIVERELOAD_CDEF") from None
    try:
        unchanged = output.read_bytes() == fresh.read_bytes()
    except OSError:
        unchanged = False
    if unchanged:
        fresh.unlink()
    else:
        os.replace(fresh, output)
    return output


def _same_inputs(inputs: dict) -> bool:
    """Does every input recorded at the last build still have the signature it had then?"""
    for path, signature in inputs.items():
        now = file_signature(path)
        if now is None or signature is None or list(now) != list(signature):
            return False
    return True
