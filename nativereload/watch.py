"""File watching: module files replaced -> reload; sources edited -> build -> reload.

Two watchers, one idea (notice a change, wait until it is complete, act, keep
going whatever happens):

``watch_module_files(registry)`` (``Registry(auto_reload=True)``,
``reg.watch_files()``): a daemon thread polls the file of every module the
registry has loaded (found through ``registry.status()`` at each poll) and
reloads a module when its file was replaced. A changed file is reloaded only
once it is stable -- the same inode, size and mtime at two polls in a row --
and a complete ELF (``elfcheck.check``): glibc's dlopen dies with SIGBUS on a
half-written library, so a file still being written is retried at the next
poll, never loaded. A reload that fails is logged and not retried until the
file changes again; the old image keeps serving.

``watch_sources(...)`` (``nativereload watch``): waits for changes under a
source directory (watchfiles when installed, else polling; editors'
temporary files ignored), builds (a CMake project, or C files through
``build.compile_sources``), and reloads the modules whose output file
changed in the target processes, through their control sockets. A failed
build or reload is reported and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from . import elf, elfcheck
from .build import BuildResult, file_signature
from .errors import ControlError, NativeReloadError
from .output import arrow

__all__ = ["ModuleFileWatcher", "ignored_name", "watch_module_files", "watch_sources"]

logger = logging.getLogger(__name__)

_Signature = tuple[int, int, int]


# --------------------------------------------------------------------------- in-process


@dataclasses.dataclass
class _Watched:
    generation: int
    baseline: _Signature | None  # the file as it was when the current generation was loaded
    pending: _Signature | None = None  # a changed file seen once; reloaded if seen again unchanged
    reported: _Signature | None = None  # last incomplete file logged, to log it once


class ModuleFileWatcher:
    """A daemon thread that reloads a registry's modules when their files are replaced.

    Thread-safe: ``close()`` may be called from any thread, more than once.
    """

    def __init__(self, registry: Any, interval: float = 0.2) -> None:
        self._registry = registry
        self._interval = interval
        self._watched: dict[str, _Watched] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nativereload-watch-files", daemon=True)

    def start(self) -> "ModuleFileWatcher":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling (a reload in progress finishes first)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:
                # Never let the watcher die of a surprise: the next poll tries again.
                logger.exception("module file watcher: poll failed")

    def poll(self) -> list[str]:
        """Check every loaded module's file once; return the names reloaded."""
        reloaded = []
        current = {}
        for m in self._registry.status():
            active = [i for i in m.images if i.state == "active"]
            if active and m.path:
                current[m.name] = (m, active[-1])
        for name in list(self._watched):
            if name not in current:
                del self._watched[name]
        for name, (m, image) in current.items():
            if self._stop.is_set():
                break
            sig = file_signature(m.path)
            watched = self._watched.get(name)
            if watched is None or watched.generation != m.generation:
                # First sight of this generation (loaded, or reloaded by someone
                # else). Its copy was written at load, after the source was: a
                # source newer than the copy was replaced since.
                copy = file_signature(image.copy_path) if image.copy_path else None
                replaced = sig is not None and copy is not None and sig[2] > copy[2]
                self._watched[name] = watched = _Watched(m.generation, None if replaced else sig)
            if sig is None or sig == watched.baseline:
                watched.pending = None
                continue
            if sig != watched.pending:
                # Changed since the last poll: still being written, or just
                # replaced. Wait for one poll with no change (the debounce).
                watched.pending = sig
                continue
            try:
                elfcheck.check(m.path)
            except (elf.ELFError, OSError) as exc:
                if watched.reported != sig:
                    logger.info("module '%s': %s is not a complete library yet (%s); will retry", name, m.path, exc)
                    watched.reported = sig
                continue
            try:
                module = self._registry.reload(name)
            except NativeReloadError as exc:
                # The old image keeps serving; try again when the file changes.
                logger.error("module '%s': automatic reload from %s failed: %s", name, m.path, exc)
                watched.baseline = sig
                watched.pending = None
                continue
            self._watched[name] = _Watched(module.generation, sig)
            reloaded.append(name)
            logger.info("module '%s': file replaced, reloaded as generation %d", name, module.generation)
        return reloaded


_watchers: "weakref.WeakKeyDictionary[Any, ModuleFileWatcher]" = weakref.WeakKeyDictionary()
_watchers_lock = threading.Lock()


def watch_module_files(registry: Any, interval: float = 0.2) -> ModuleFileWatcher:
    """Start a ModuleFileWatcher on ``registry``; ``registry.close()`` stops it.

    Idempotent: while one is running for this registry, it is returned (two
    watchers would both reload the same replaced file).
    """
    with _watchers_lock:
        running = _watchers.get(registry)
        if running is not None and not running.closed:
            return running
        watcher = _watchers[registry] = ModuleFileWatcher(registry, interval).start()
    registry._add_closer(watcher.close)     # registry.close() stops it first
    return watcher


# --------------------------------------------------------------------------- sources -> build -> reload

# Files that editors and tools make beside the ones they save, and build
# output: a change to one of them is not an edit of the sources.
_IGNORED = re.compile(r"""^(?:
      \..*                              # hidden: vim .swp, emacs .#lock, .goutputstream-*, x.partial
    | .*~ | \#.*\#                       # backups, emacs autosave
    | .*\.(?:swp|swx|swo|tmp|temp|bak|orig|rej|part|partial|crdownload|kate-swp|o|obj|d|pyc)
    | sed[A-Za-z0-9]{6}                  # sed -i's temporary file
    | \d+                                # vim's write test (4913)
    | .*___jb_(?:tmp|old)___             # JetBrains' safe write
    | __pycache__ | node_modules
)$""", re.X)


def ignored_name(name: str) -> bool:
    """Is a file of this name an editor's or tool's temporary file, or build output (not a source)?"""
    return bool(_IGNORED.match(name))


def _ignored(path: Path, build_dir: Path) -> bool:
    return ignored_name(path.name) or path == build_dir


def _snapshot(source_dir: Path, build_dir: Path) -> dict[str, _Signature]:
    """Signatures of the files under ``source_dir``, skipping build trees and temporary files."""
    found = {}
    for root, dirs, files in os.walk(source_dir):
        here = Path(root)
        # Another configured build directory is output, not source.
        dirs[:] = [d for d in dirs if not _ignored(here / d, build_dir)
                   and not (here / d / "CMakeCache.txt").exists()]
        for name in files:
            path = here / name
            if _ignored(path, build_dir):
                continue
            sig = file_signature(path)
            if sig is not None:
                found[str(path)] = sig
    return found


def _poll_changes(source_dir: Path, build_dir: Path, interval: float,
                  stop: threading.Event) -> Iterator[set[str]]:
    # The first snapshot is taken here, eagerly (not at the first next()):
    # an edit made while the start-up build runs must count as a change.
    previous = _snapshot(source_dir, build_dir)

    def changes() -> Iterator[set[str]]:
        nonlocal previous
        while not stop.wait(interval):
            now = _snapshot(source_dir, build_dir)
            if now == previous:
                continue
            # Debounce: an editor's save or a `git checkout` touches several
            # files; wait until one interval passes with no further change.
            while not stop.wait(interval):
                settled = _snapshot(source_dir, build_dir)
                if settled == now:
                    break
                now = settled
            changed = {p for p in set(now) | set(previous) if now.get(p) != previous.get(p)}
            previous = now
            yield changed

    return changes()


def _watchfiles_changes(watchfiles: Any, source_dir: Path, build_dir: Path, interval: float,
                        stop: threading.Event, notify: Callable[[str], None]) -> Iterator[set[str]]:
    def keep(_change: Any, path: str) -> bool:
        p = Path(path)
        if p == build_dir or build_dir in p.parents:
            return False
        return not any(_ignored(part, build_dir) for part in [p, *p.parents] if source_dir in part.parents)

    # watchfiles starts watching at its generator's first next(): run it in a
    # thread started now, before the start-up build, so no edit falls between.
    found: queue.Queue = queue.Queue()

    def produce() -> None:
        try:
            for batch in watchfiles.watch(source_dir, watch_filter=keep, stop_event=stop, raise_interrupt=False):
                found.put({path for _change, path in batch})
        except Exception as exc:
            found.put(exc)
        found.put(None)

    threading.Thread(target=produce, name="nativereload-watch-sources", daemon=True).start()

    def changes() -> Iterator[set[str]]:
        while not stop.is_set():
            try:
                item = found.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                # e.g. the inotify watch limit (fs.inotify.max_user_watches) is reached.
                notify(f"inotify failed ({type(item).__name__}: {item}); polling every {interval:g} s instead")
                yield from _poll_changes(source_dir, build_dir, interval, stop)
                return
            yield item

    return changes()


def _changes(source_dir: Path, build_dir: Path, interval: float, stop: threading.Event, poll: bool,
             notify: Callable[[str], None]) -> tuple[Iterator[set[str]], str]:
    """Start watching now; return an iterator of the sets of paths changed since, and how it watches."""
    if poll:
        how = f"polling every {interval:g} s (--poll)"
    else:
        try:
            import watchfiles
        except ImportError:
            how = (f"polling every {interval:g} s (watchfiles is not installed; pip install 'nativereload[watch]' "
                   "to be notified through inotify instead)")
        else:
            return _watchfiles_changes(watchfiles, source_dir, build_dir, interval, stop, notify), \
                "notified through inotify (watchfiles)"
    return _poll_changes(source_dir, build_dir, interval, stop), how


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def watch_sources(source_dir: str | os.PathLike, build_dir: str | os.PathLike, *,
                  targets: Callable[[], list[Any]], builder: Callable[[IO[str]], BuildResult] | None = None,
                  what: str | None = None, config: str = "RelWithDebInfo", interval: float = 0.5,
                  poll: bool = False, stop: threading.Event | None = None, out: Any = None,
                  err: Any = None) -> None:
    """Build now, then after every change under ``source_dir``; reload what each build changed.

    Runs until ``stop`` is set (or KeyboardInterrupt). ``builder(output)``
    builds and returns a BuildResult (default: the CMake project at
    ``source_dir`` into ``build_dir``, with ``config``); ``what`` says what is
    built, for the start-up line. ``targets()`` is called at each round and
    returns control.Target objects: processes come and go while a developer
    works. A module is reloaded in a process when the process has it loaded
    from the file the build changed. ``poll`` forces the polling fallback
    even when watchfiles is installed (file systems without inotify, e.g.
    some network and container mounts). Each line it prints starts with the
    time.
    """
    from . import build
    from .control import client

    source_dir = Path(source_dir).resolve()
    build_dir = Path(build_dir).resolve()
    stop = stop or threading.Event()
    out = out or sys.stdout
    err = err or sys.stderr
    if builder is None:
        def builder(output: IO[str]) -> BuildResult:
            return build.build(source_dir, build_dir, config=config, output=output)
        what = what or f"CMake project {source_dir} -> {build_dir}"

    def say(stream: Any, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=stream, flush=True)

    def round_(reason: str) -> None:
        say(err, f"{reason}; building")
        try:
            result = builder(err)
        except build.BuildError as exc:
            say(err, f"error: {exc}")
            say(err, "hint: the running processes keep the old code; fix the error and save again")
            return
        if not result.built:
            say(err, "no module changed")
            return
        for m in result.built:
            say(out, f"built {m.name}: {m.path}")
        try:
            reachable = targets()
        except Exception as exc:  # CLIError and friends: report, keep watching
            say(err, f"error: {exc}")
            hint = getattr(exc, "hint", None)
            if hint:
                say(err, f"hint: {hint}")
            return
        reloads = 0
        for target in reachable:
            label = getattr(target, "label", None) or f"pid {target.pid}"
            try:
                status = client.request(target.path, "status")
            except ControlError as exc:
                say(err, f"error: {label}: {exc}")
                continue
            loaded = [mod for mod in status.get("modules", [])
                      if mod.get("path") and any(i.get("state") == "active" for i in mod.get("images", []))]
            for m in result.built:
                for mod in loaded:
                    if not _same_file(mod["path"], m.path):
                        continue
                    try:
                        reply = client.request(target.path, "reload", module=mod["name"])
                    except ControlError as exc:
                        reply = {"ok": False, "error": {"type": "ControlError", "message": str(exc)}}
                    reloads += 1
                    if reply.get("ok"):
                        say(out, f"{label}: reloaded {mod['name']!r} generation {reply['generation_before']} "
                                 f"{arrow(out)} {reply['generation']} in {reply['seconds'] * 1000:.1f} ms")
                    else:
                        e = reply.get("error", {})
                        say(err, f"error: {label}: reload of {mod['name']!r} failed: {e.get('type')}: "
                                 f"{e.get('message')}")
                        say(err, "hint: the old version keeps serving; fix it and save again")
        if not reloads:
            say(err, "no reachable process has these modules loaded")

    changes, how = _changes(source_dir, build_dir, interval, stop, poll, lambda text: say(err, text))
    say(err, f"nativereload watch: watching {source_dir} ({what}); {how}; Ctrl-C stops")
    try:
        round_("starting")
        for changed in changes:
            shown = sorted(os.path.relpath(p, source_dir) for p in changed)
            round_(f"changed: {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}")
    finally:
        stop.set()
