"""The pytest plugin: test your own C module's reload safety in your CI.

Installed with the package (entry point ``pytest11``), so the fixtures are
there in any project that has nativereload installed:

``nativereload_registry``
    A Registry isolated in the test's temporary directory, closed at
    teardown. Teardown fails the test if an image did not drain, was
    leaked (the dynamic loader kept it mapped), a private copy was left on
    disk, or a descriptor or mapping of one is still open.

``nativereload_build``
    ``nativereload_build(sources, *, name=None, defines=None, ...) -> Path``
    builds a module from C files (``nativereload build FILE.c``), or
    ``nativereload_build(cmake=DIR, target=NAME, defines=...)`` a target of
    a CMake project through the CMake helper, into a per-session cache: the
    same arguments are built once, so a test can ask for v1 and v2 of one
    module with different defines. Relative paths are taken from pytest's
    rootdir.

``assert_reload_safe(registry, name, builds=[v1, v2], workload=fn, threads=4, reloads=100)``
    Loads the first build, runs ``workload(module)`` in a loop on
    ``threads`` threads, and reloads ``reloads`` times, cycling through the
    builds. Fails (with a message written for you, not a traceback of
    nativereload) on any exception in the workload, a result it rejects, a
    refused reload, an image that does not drain, or a mapping, descriptor
    or file left behind.

    def test_counter_is_reload_safe(nativereload_registry, nativereload_build):
        v1 = nativereload_build(["src/counter.c"], defines={"VERSION": 1})
        v2 = nativereload_build(["src/counter.c"], defines={"VERSION": 2})

        def workload(counter):
            assert counter.add(2, 3) == 5
            assert counter.version() in (1, 2)

        assert_reload_safe(nativereload_registry, "counter", builds=[v1, v2], workload=workload)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytest

from .build import BuildError, build, compile_sources
from .errors import NativeReloadError
from .registry import Module, Registry

__all__ = ["ReloadReport", "assert_reload_safe", "nativereload_build", "nativereload_registry"]

DRAIN_TIMEOUT = 10.0
"""Seconds a replaced image may take to drain before the check fails."""


# --------------------------------------------------------------------------- what the process holds

def _mapped(paths: set[str]) -> set[str]:
    """Which of ``paths`` are mapped into this process (``/proc/self/maps``; " (deleted)" counts)."""
    found = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    path = fields[5].rstrip("\n").removesuffix(" (deleted)")
                    if path in paths:
                        found.add(path)
    except OSError:
        pass
    return found


def _open_under(directories: Iterable[str]) -> list[str]:
    """This process's descriptors on files under ``directories`` (``/proc/self/fd``)."""
    prefixes = tuple(os.path.join(d, "") for d in directories)
    found = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
        except OSError:
            continue
        if target.startswith(prefixes):
            found.append(f"fd {fd} -> {target}")
    return found


def _files_under(directory: str) -> list[str]:
    """Files left under ``directory`` other than registries' ``.lock`` files."""
    return sorted(str(p) for p in Path(directory).rglob("*") if p.is_file() and p.name != ".lock")


def _leftovers(registry: Registry, tmpdir: str) -> list[str]:
    """What a closed registry left behind in ``tmpdir``: each a sentence for the failure message."""
    problems = []
    for m in registry.status():
        for image in m.images:
            if image.state == "leaked":
                problems.append(f"module '{m.name}' generation {image.generation} leaked: the dynamic loader "
                                f"kept {image.copy_path} mapped after dlclose (C++ STB_GNU_UNIQUE symbols, "
                                "thread_local destructors or RTLD_NODELETE; build C++ with -fno-gnu-unique)")
            else:
                problems.append(f"module '{m.name}' generation {image.generation} did not drain: "
                                f"{image.in_flight} call(s) still in flight after {DRAIN_TIMEOUT:g} s")
    # Only the copies of images that closed: one still listed is reported above.
    listed = {i.copy_path for m in registry.status() for i in m.images}
    files = [f for f in _files_under(tmpdir) if f not in listed]
    mapped = _mapped(set(files))
    for path in files:
        problems.append(f"private copy left on disk{' and still mapped' if path in mapped else ''}: {path}")
    for entry in _open_under([tmpdir]):
        target = entry.split(" -> ", 1)[1]
        if target not in listed and not target.endswith(f"{os.sep}.lock"):
            problems.append(f"descriptor still open: {entry}")
    return problems


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def nativereload_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Registry whose private copies live in a directory of this test's own; checked for leaks at teardown.

    Teardown closes it and fails the test if an image did not drain within
    ``DRAIN_TIMEOUT`` seconds, leaked, or left a copy, a descriptor or a
    mapping behind.
    """
    copies = tmp_path_factory.mktemp("nativereload-copies")
    registry = Registry(tmpdir=copies)
    yield registry
    drained = registry.close(timeout=DRAIN_TIMEOUT)
    problems = _leftovers(registry, str(copies))
    if not drained and not problems:
        problems.append(f"an image did not drain within {DRAIN_TIMEOUT:g} s of close()")
    if problems:
        pytest.fail("nativereload_registry: the registry did not clean up after the test:\n  - "
                    + "\n  - ".join(problems), pytrace=False)


@dataclasses.dataclass(frozen=True)
class _Builder:
    root: Path
    cache: Path
    built: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __call__(self, sources: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                 name: str | None = None, defines: Mapping[str, object] | Iterable[str] | None = None,
                 include_dirs: Iterable[str | os.PathLike] = (), libraries: Iterable[str] = (),
                 library_dirs: Iterable[str | os.PathLike] = (), cflags: Iterable[str] = (),
                 cmake: str | os.PathLike | None = None, target: str | None = None) -> Path:
        if (sources is None) == (cmake is None):
            pytest.fail("nativereload_build: pass C files (nativereload_build(['src/m.c'])) or a CMake project "
                        "(nativereload_build(cmake='.', target='m')), one of the two", pytrace=False)
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        defines = dict(defines) if isinstance(defines, Mapping) else {d.partition("=")[0]: d.partition("=")[2]
                                                                       or None for d in defines or ()}
        key = json.dumps([[str(self.root / s) for s in sources or ()], name, sorted(defines.items(), key=str),
                          [str(self.root / d) for d in include_dirs], list(libraries),
                          [str(self.root / d) for d in library_dirs], list(cflags),
                          None if cmake is None else str(self.root / cmake), target], default=str)
        with self.lock:
            done = self.built.get(key)
            if done is not None:
                return done
            out = self.cache / hashlib.sha256(key.encode()).hexdigest()[:16]
            messages = io.StringIO()
            try:
                if cmake is not None:
                    result = build(self.root / cmake, out, target=target, output=messages,
                                   definitions={k: ("ON" if v is None else v) for k, v in defines.items()})
                    wanted = [m for m in result.modules if m.name == (name or target)] or list(result.modules)
                    if len(wanted) != 1:
                        pytest.fail(f"nativereload_build: the CMake project {self.root / cmake} produced "
                                    f"{len(wanted)} modules ({', '.join(m.name for m in wanted) or 'none'}); "
                                    "pass target=NAME", pytrace=False)
                    path = wanted[0].path
                else:
                    result = compile_sources([self.root / s for s in sources], out, name=name,
                                             include_dirs=[self.root / d for d in include_dirs], defines=defines,
                                             libraries=libraries, library_dirs=[self.root / d for d in library_dirs],
                                             cflags=cflags, output=messages)
                    path = result.modules[0].path
                    if all(Path(src).suffix == ".c" for src in sources):
                        _record_cdef(path, [self.root / s for s in sources],
                                     include_dirs=[self.root / d for d in include_dirs],
                                     defines=[f"{k}" if v is None else f"{k}={v}" for k, v in defines.items()])
            except BuildError as exc:
                pytest.fail(f"nativereload_build: {exc}\n{messages.getvalue()}", pytrace=False)
            self.built[key] = path
            return path


def _record_cdef(library: Path, sources: list[Path], *, include_dirs: list[Path], defines: list[str]) -> None:
    """Write, beside a library built from C files, the declarations of the functions they define.

    ``assert_reload_safe`` loads each build with them when no cdef is given.
    Best effort: a library without it just needs an explicit cdef.
    """
    try:
        from .cdefgen import cdef_from_source

        text = "\n".join(cdef_from_source(src, include_dirs=include_dirs, defines=defines) for src in sources)
    except Exception:      # an interface that cannot be derived: the caller passes cdef=
        return
    library.with_suffix(".cdef").write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def nativereload_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``nativereload_build(sources | cmake=DIR, *, name, defines, include_dirs, libraries, ...) -> Path``.

    Builds once per session for each distinct set of arguments (C files with
    the flags reloading needs, or a CMake target through the CMake helper) and
    returns the module file. Relative paths are taken from pytest's rootdir.
    A build failure fails the test with the compiler's messages.
    """
    return _Builder(Path(request.config.rootpath), tmp_path_factory.mktemp("nativereload-builds"))


# --------------------------------------------------------------------------- assert_reload_safe

@dataclasses.dataclass(frozen=True)
class ReloadReport:
    """What ``assert_reload_safe`` did, when it passed.

    Attributes:
        reloads: reloads done.
        calls: workload calls completed, over all threads.
        seconds: wall time.
        generation: the module's last generation.
    """

    reloads: int
    calls: int
    seconds: float
    generation: int


class _Failures:
    """Failures seen by the workload threads and the reloader, grouped: first occurrence, count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, tuple[str, str]] = {}

    def add(self, key: str, summary: str, details: str = "") -> None:
        with self._lock:
            self.counts[key] += 1
            self.first.setdefault(key, (summary, details))

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        lines = []
        for key, n in self.counts.items():
            summary, details = self.first[key]
            lines.append(summary + (f" ({n} times)" if n > 1 else "") + details)
        return lines


def _install(build_file: Path, target: Path) -> None:
    """Copy ``build_file`` to ``target`` by rename (never overwrite a file a registry may be copying)."""
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    shutil.copyfile(build_file, partial)
    os.replace(partial, target)


def _cdef_for(build_file: Path, cdef: str | None, name: str) -> str:
    if cdef is not None:
        return cdef
    recorded = build_file.with_suffix(".cdef")
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8")
    pytest.fail(f"assert_reload_safe('{name}'): no cdef for {build_file} — pass cdef='...' (only builds of C files "
                "by nativereload_build carry their declarations)", pytrace=False)


def assert_reload_safe(registry: Registry, name: str, builds: Sequence[str | os.PathLike],
                       workload: Callable[[Module], Any], *, threads: int = 4, reloads: int = 100,
                       cdef: str | None = None, drain_timeout: float = DRAIN_TIMEOUT) -> ReloadReport:
    """Reload ``name`` ``reloads`` times between ``builds`` while ``threads`` threads run ``workload``.

    ``workload(module)`` is called in a loop on each thread; it should call
    the module's functions and check their results. It rejects a result by
    raising AssertionError (an ``assert``) or returning False; any other
    exception is an error. Calls a reload catches in flight must finish on
    the image they started on, so the workload must accept the results of
    every build (e.g. ``version() in (1, 2)``).

    The module must not be loaded in ``registry`` yet: it is loaded from a
    private copy of ``builds[0]`` and unloaded at the end. Each build is
    loaded with ``cdef``, or with the declarations ``nativereload_build``
    derived from its C files.

    Returns:
        a ReloadReport, when nothing went wrong.

    Fails the test (``pytest.fail``, no traceback of nativereload's own) on:
    an exception or a rejected result in the workload, a refused load or
    reload, a workload thread still running after the reloads, an image that
    does not drain within ``drain_timeout`` seconds, or a replaced image
    whose copy is still mapped, open or on disk.
    """
    who = f"assert_reload_safe('{name}')"
    if not builds:
        pytest.fail(f"{who}: builds is empty — pass at least one build (two to reload between versions)",
                    pytrace=False)
    builds = [Path(b) for b in builds]
    for b in builds:
        if not b.is_file():
            pytest.fail(f"{who}: build {b} does not exist", pytrace=False)
    if any(m.name == name for m in registry.status()):
        pytest.fail(f"{who}: module '{name}' is already loaded in this registry — assert_reload_safe loads it "
                    "itself (and unloads it at the end)", pytrace=False)
    cdefs = [_cdef_for(b, cdef, name) for b in builds]
    staging = Path(tempfile.mkdtemp(prefix="nativereload-reload-safe-"))
    started = time.perf_counter()
    failures = _Failures()
    copies: set[str] = set()
    calls = [0] * threads
    stop = threading.Event()
    workers: list[threading.Thread] = []
    done = 0
    module = None
    try:
        module_file = staging / f"{name}.so"
        _install(builds[0], module_file)
        try:
            module = registry.load(name, cdef=cdefs[0], file=module_file)
        except NativeReloadError as exc:
            pytest.fail(f"{who}: the first build {builds[0]} does not load: {type(exc).__name__}: {exc}",
                        pytrace=False)
        copies.update(i.copy_path for m in registry.status() if m.name == name for i in m.images)

        def run(index: int) -> None:
            while not stop.is_set():
                generation = module.generation
                try:
                    verdict = workload(module)
                except AssertionError as exc:
                    first, rest = _message(exc)
                    where = _where(exc)
                    failures.add(f"rejected:{where}:{first}", f"the workload rejected a result{where} (first near "
                                 f"generation {generation}): {first or 'assert failed'}", rest)
                    continue
                except Exception as exc:
                    first, rest = _message(exc)
                    where = _where(exc)
                    failures.add(f"error:{type(exc).__name__}:{where}:{first}",
                                 f"the workload raised {type(exc).__name__}{where} (first near generation "
                                 f"{generation}): {first}", rest)
                    continue
                if verdict is False:
                    failures.add("false", f"the workload returned False (near generation {generation})")
                    continue
                calls[index] += 1

        workers = [threading.Thread(target=run, args=(i,), name=f"nativereload-workload-{i}", daemon=True)
                   for i in range(threads)]
        for w in workers:
            w.start()
        for done in range(1, reloads + 1):
            which = done % len(builds)
            _install(builds[which], module_file)
            try:
                registry.reload(name, cdef=cdefs[which])
            except NativeReloadError as exc:
                failures.add(f"reload:{type(exc).__name__}", f"reload {done} (to build {which}: {builds[which]}) "
                             f"was refused: {type(exc).__name__}: {exc}")
                break
            copies.update(i.copy_path for m in registry.status() if m.name == name for i in m.images)
            if failures.counts.total() > 100:
                break        # it is failing: enough evidence
    finally:
        stop.set()
        stuck = []
        for w in workers:
            w.join(timeout=drain_timeout)
            if w.is_alive():
                stuck.append(w.name)
        if stuck:
            failures.add("stuck", f"{len(stuck)} workload thread(s) still inside a call {drain_timeout:g} s after "
                         "the reloads ended (a call that never returns keeps its image from draining)")
        if module is not None:
            generation = module.generation
            try:
                registry.unload(name)
            except NativeReloadError:
                pass
        shutil.rmtree(staging, ignore_errors=True)
    drained = registry.wait_drained(timeout=drain_timeout)
    for m in registry.status():
        for image in m.images:
            if m.name != name:
                continue
            if image.state == "leaked":
                failures.add(f"leak:{image.generation}", f"generation {image.generation} leaked: the dynamic loader "
                             f"kept {image.copy_path} mapped after dlclose (C++ STB_GNU_UNIQUE symbols, "
                             "thread_local destructors or RTLD_NODELETE; build C++ with -fno-gnu-unique)")
            elif not drained:
                failures.add(f"drain:{image.generation}", f"generation {image.generation} did not drain within "
                             f"{drain_timeout:g} s ({image.in_flight} call(s) in flight)")
    # The copies of the images that closed must be gone: unmapped, no descriptor, not on disk. (An image
    # still listed has drained late or leaked, and is reported above.)
    closed = copies - {i.copy_path for m in registry.status() for i in m.images}
    for path in sorted(_mapped(closed)):
        failures.add(f"mapped:{path}", f"a closed image is still mapped: {path}")
    for entry in _open_under({os.path.dirname(c) for c in closed}):
        if entry.split(" -> ", 1)[1] in closed:
            failures.add(f"fd:{entry}", f"a descriptor of a closed image is still open: {entry}")
    for path in sorted(p for p in closed if os.path.lexists(p)):
        failures.add(f"file:{path}", f"the private copy of a closed image is still on disk: {path}")
    seconds = time.perf_counter() - started
    total = sum(calls)
    if failures:
        pytest.fail(f"{who}: {sum(failures.counts.values())} failure(s) in {done} of {reloads} reload(s) under "
                    f"{threads} thread(s) ({total} workload calls passed):\n  - " + "\n  - ".join(failures.lines()),
                    pytrace=False)
    if total == 0:
        pytest.fail(f"{who}: the workload never completed a call in {seconds:.1f} s", pytrace=False)
    return ReloadReport(reloads=done, calls=total, seconds=seconds, generation=generation)


def _message(exc: BaseException) -> tuple[str, str]:
    """An exception's message: its first line, and the rest indented (pytest's assertion explanation)."""
    first, _, rest = str(exc).partition("\n")
    return first, "".join(f"\n      {line}" for line in rest.splitlines())


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame of ``exc`` outside nativereload (the user's line)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}nativereload{os.sep}" not in f.filename]
    return f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
