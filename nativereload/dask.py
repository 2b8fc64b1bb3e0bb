"""Reload a C module in every worker of a Dask cluster: the worker plugin, the cluster reload, the report.

    pip install "nativereload[dask]"       # on the client and on every worker

    from nativereload import dask as nrdask
    client.register_plugin(nrdask.NativeReload({"counter": "build/modules/counter.so"}))
    client.submit(lambda x: nrdask.registry().func("counter.add")(x, 1), 41).result()    # 42
    report = nrdask.reload(client, "counter", file="build/modules/counter.so")
    print(report.table())

What it does, and what it promises:
  - Each worker process gets one Registry (``NativeReload.setup``), whose copies live in a
    directory of its own under the worker's local directory, removed at teardown. Module files
    travel as bytes inside Dask's messages: workers need no shared file system.
  - The current build of each module is kept on the scheduler (its metadata, under the plugin's
    token): a worker that joins later (scale-up, a nanny restart) loads that build, not the one
    the plugin was registered with.
  - ``reload(mode="all-or-nothing")``: one round of messages sends the file to every worker and
    prepares it there (``Registry.prepare``); only if every worker prepared it does a second
    round commit everywhere, else a round aborts everywhere. No worker serves a build another
    worker refused. The commits land within that second round, not at one instant: in between,
    some workers serve the new build and some the old (``report.commit_window`` measures it).
  - ``reload(mode="rolling")``: a batch of workers at a time reloads (prepare + commit), stopping
    at the first failure; ``rollback=True`` then takes the switched workers back.
  - Reloads and unloads of one module are serialized across clients by a Dask ``Lock`` named
    ``nativereload:NAME``: two of them cannot interleave into a mixed cluster.
  - The workers' side runs through ``Client.run``, outside the task queue (workers busy with
    long tasks still answer), on each worker's event loop, with copying and dlopen in a thread.
  - A reload prepared on a worker and then neither committed nor aborted (its client died) is
    aborted by the worker itself ``timeout`` + 60 s after it was prepared.

distributed is imported here, not by ``import nativereload``: the package works without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NamedTuple

try:
    import distributed
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as _exc:      # the package imports without it; this module does not
    raise ImportError('nativereload.dask needs Dask\'s distributed: pip install "nativereload[dask]"') from _exc

from .errors import ClusterReloadError, LoadError, ModuleNotFound, ModuleNotLoaded, NativeReloadError
from .output import arrow
from .registry import ImageStatus, ModuleStatus, Registry

__all__ = ["ClusterReport", "MODES", "NativeReload", "PLUGIN_NAME", "WorkerResult", "WorkerStatus", "func",
           "registry", "reload", "status", "status_json", "status_table", "unload"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PLUGIN_NAME = "nativereload"
MODES = ("all-or-nothing", "rolling")
_METADATA = "nativereload"       # scheduler metadata: [_METADATA, token, module] -> the current build (or None)
_EXPIRY_MARGIN = 60.0            # a prepared reload outlives its round's timeout by this much, then aborts itself
_PLUGIN_WAIT = 5.0               # how long an operation on a worker that just joined waits for its plugin


class _Build(NamedTuple):
    """One build of a module as it travels to the workers: the file's bytes and what to load them with."""

    name: str
    data: bytes
    sha256: str
    cdef: str | None
    source: str                  # the path the client read it from ("" if it was given as bytes)

    @classmethod
    def read(cls, name: str, file: str | os.PathLike | bytes, cdef: str | None) -> "_Build":
        if isinstance(file, (bytes, bytearray, memoryview)):
            data, source = bytes(file), ""
        else:
            source = os.path.abspath(os.fspath(file))
            try:
                with open(source, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ModuleNotFound(f"module '{name}': {source} does not exist — build it first, or pass the path "
                                     "of the built file", module=name, searched=(source,)) from None
            except OSError as exc:
                raise LoadError(f"module '{name}': cannot read {source}: {exc.strerror}", module=name, path=source,
                                reason=exc.strerror) from None
        return cls(name, data, hashlib.sha256(data).hexdigest(), cdef, source)


class _Installed(NamedTuple):
    """A build as a worker keeps it: the file it wrote, where the build came from, the cdef it was loaded with."""

    sha256: str
    source: str
    path: str
    cdef: str | None


class _Pending(NamedTuple):
    """A reload prepared on a worker, waiting for the client's commit or abort."""

    reload_id: str
    staged: Any                  # the StagedReload
    installed: _Installed
    timer: asyncio.TimerHandle


# --------------------------------------------------------------------------- the worker plugin

class NativeReload(WorkerPlugin):
    """A Dask worker plugin: one :class:`~nativereload.Registry` in each worker process, loading ``modules``.

    Register it with ``client.register_plugin(NativeReload(...))``; tasks then reach the worker's
    registry with :func:`registry`. The files are read here and travel as bytes: workers need no
    shared file system. Registering another NativeReload replaces this one (each worker closes
    its registry and loads the new plugin's modules); ``client.unregister_worker_plugin("nativereload")``
    closes the registries and removes their directories.

    Args:
        modules: module name -> the built file (a path on this machine, or its bytes).
        cdef: module name -> its declarations, for modules that do not embed their interface.
        tmpdir: where each worker keeps its files and copies (default: the worker's local directory).
        close_timeout: at teardown, seconds to wait for calls in flight before the directory goes.
        **registry_options: passed to each worker's Registry (``held_warning``, ``trusted_hashes``, ...).

    Raises:
        ModuleNotFound, LoadError: a file cannot be read. ValueError: a cdef for a module not listed.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, modules: Mapping[str, str | os.PathLike | bytes] | None = None, *,
                 cdef: Mapping[str, str] | None = None, tmpdir: str | os.PathLike | None = None,
                 close_timeout: float = 10.0, **registry_options: Any) -> None:
        modules = dict(modules or {})
        cdef = dict(cdef or {})
        stray = sorted(set(cdef) - set(modules))
        if stray:
            raise ValueError(f"cdef given for {', '.join(stray)}, which modules does not list")
        # The token names this registration's builds on the scheduler: a plugin registered later
        # starts from its own modules, not from what an earlier one's reloads left there.
        self.token = uuid.uuid4().hex
        self.modules = {name: _Build.read(name, file, cdef.get(name)) for name, file in modules.items()}
        self.tmpdir = None if tmpdir is None else os.fspath(tmpdir)
        self.close_timeout = close_timeout
        self.registry_options = registry_options
        self._reset()

    def _reset(self) -> None:
        """The worker's state (made by setup, never pickled)."""
        self._registry: Registry | None = None
        self._lock: asyncio.Lock | None = None
        self._directory: str | None = None
        self._address = "?"
        self._current: dict[str, _Installed] = {}
        self._previous: dict[str, _Installed] = {}
        self._pending: dict[str, _Pending] = {}
        self._cancelled: collections.deque[str] = collections.deque(maxlen=64)   # aborted before they arrived
        self._tasks: set[asyncio.Task] = set()

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        where = f" on {self._address}" if self._registry is not None else ""
        return f"<nativereload.dask.NativeReload {sorted(self.modules)}{where}>"

    async def setup(self, worker: Any) -> None:
        """Make this worker's registry and load the current build of every module.

        Raises:
            NativeReloadError: a module could not be loaded here (the others are; that one is not).
        """
        self._lock = asyncio.Lock()
        async with self._lock:       # operations that arrive meanwhile wait for the modules to load
            self._address = worker.address
            self._directory = tempfile.mkdtemp(prefix="nativereload-", dir=self.tmpdir or worker.local_directory)
            os.mkdir(os.path.join(self._directory, "files"), 0o700)
            self._registry = Registry(tmpdir=self._directory, **self.registry_options)
            builds = dict(self.modules)
            current = await worker.scheduler.get_metadata(keys=[_METADATA, self.token], default=None) or {}
            for name, build in current.items():
                if build is None:
                    builds.pop(name, None)          # unloaded across the cluster since
                else:
                    builds[name] = _Build(**build)   # reloaded across the cluster since
            failed = []
            for build in builds.values():
                try:
                    await asyncio.to_thread(self._load, build)
                except NativeReloadError as exc:
                    failed.append(f"{build.name}: {exc}")
            if failed:
                raise NativeReloadError(f"worker {self._address}: {len(failed)} of {len(builds)} module(s) could not "
                                        "be loaded:\n  " + "\n  ".join(failed))
        logger.info("worker %s: nativereload plugin ready with %s in %s", self._address,
                    ", ".join(f"'{b.name}' ({b.sha256[:12]})" for b in builds.values()) or "no modules",
                    self._directory)

    async def teardown(self, worker: Any) -> None:
        """Abort prepared reloads, close the registry, and remove this worker's directory."""
        if self._registry is None:
            return
        async with self._lock:
            for name in list(self._pending):
                await self._drop_pending(name, "because the worker plugin is closing")
            drained = await asyncio.to_thread(self._registry.close, self.close_timeout)
            files = os.path.join(self._directory, "files")
            # Images still busy after close_timeout run from their mappings; the registry removes
            # its own directory when the last one closes.
            shutil.rmtree(self._directory if drained else files, ignore_errors=True)
            self._registry = None

    # -- files and loading (in a thread: copying and dlopen block) -----------------------------

    def _install(self, build: _Build) -> _Installed:
        """Write the build's bytes into this worker's files directory (named by content, written by rename).

        A build without a cdef keeps the one the module was loaded with (as ``Registry.reload`` keeps
        the declarations): that is the cdef a worker joining later must load it with.
        """
        path = os.path.join(self._directory, "files", f"{build.name}-{build.sha256[:16]}.so")
        if not os.path.exists(path):
            fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(build.data)
                os.replace(partial, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise LoadError(f"module '{build.name}': worker {self._address} cannot store the new build in "
                                f"{os.path.dirname(path)}: {exc.strerror} — free space there, or give NativeReload "
                                "another tmpdir", module=build.name, path=path, reason=exc.strerror) from None
        current = self._current.get(build.name)
        cdef = build.cdef if build.cdef is not None or current is None else current.cdef
        return _Installed(build.sha256, build.source, path, cdef)

    def _load(self, build: _Build) -> None:
        installed = self._install(build)
        try:
            self._registry.load(build.name, build.cdef, file=installed.path)
        except BaseException:
            self._sweep()
            raise
        self._current[build.name] = installed

    def _loaded(self) -> dict[str, int]:
        """Module name -> generation, for the modules this worker serves (not those unloaded and draining)."""
        return {m.name: m.generation for m in self._registry.status() if any(i.state == "active" for i in m.images)}

    def _sweep(self) -> None:
        """Delete the files received that no module serves or waits to commit."""
        keep = {i.path for i in self._current.values()} | {p.installed.path for p in self._pending.values()}
        files = os.path.join(self._directory, "files")
        for entry in os.listdir(files):
            if os.path.join(files, entry) not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(files, entry))

    def _switched(self, name: str, installed: _Installed) -> None:
        """``installed`` now serves ``name``; what it replaced is what a rollback brings back (its bytes are
        the registry's to keep: only its description stays here)."""
        if name in self._current:
            self._previous[name] = self._current[name]
        self._current[name] = installed
        self._sweep()

    # -- operations (run by _worker_op, under the lock) ----------------------------------------

    async def _op_describe(self) -> dict:
        loaded = self._loaded()
        return {"token": self.token, "modules": {
            name: {"generation": loaded[name], "sha256": self._current[name].sha256,
                   "source": self._current[name].source} for name in loaded if name in self._current}}

    async def _op_prepare(self, name: str, build: _Build, reload_id: str, expire: float,
                          allow_interface_change: bool = False, canary: bool | str = False) -> dict:
        if reload_id in self._cancelled:     # its client timed out and aborted it before it got here
            raise NativeReloadError(f"module '{name}': this cluster reload was aborted before worker "
                                    f"{self._address} could prepare it", module=name)
        if name in self._pending:            # a prepared reload whose client went away: it expires, or is refused
            raise NativeReloadError(f"module '{name}': another cluster reload is prepared on worker "
                                    f"{self._address} (it aborts itself when it expires)", module=name)
        installed = await asyncio.to_thread(self._install, build)
        try:
            staged = await asyncio.to_thread(self._registry.prepare, name, build.cdef, file=installed.path,
                                             allow_interface_change=allow_interface_change, canary=canary)
        except BaseException:
            self._sweep()
            raise
        timer = asyncio.get_running_loop().call_later(expire, self._expire, name, reload_id)
        self._pending[name] = _Pending(reload_id, staged, installed, timer)
        return {"token": self.token, "generation_before": staged.serving_generation, "generation": staged.generation}

    async def _op_commit(self, name: str, reload_id: str) -> dict:
        pending = self._pending.get(name)
        if pending is None or pending.reload_id != reload_id:
            raise NativeReloadError(f"module '{name}': worker {self._address} has no prepared reload to commit (it "
                                    "expired, or the worker restarted) — generation "
                                    f"{self._loaded().get(name, '?')} still serving", module=name)
        pending.timer.cancel()
        del self._pending[name]

        def commit() -> tuple[Any, float]:
            at = time.time()         # the switch is the first thing commit() does
            return pending.staged.commit(), at

        module, committed_at = await asyncio.to_thread(commit)
        self._switched(name, pending.installed)
        return {"token": self.token, "generation": module.generation, "committed_at": committed_at,
                "cdef": pending.installed.cdef}

    async def _op_abort(self, name: str, reload_id: str) -> dict:
        pending = self._pending.get(name)
        aborted = pending is not None and pending.reload_id == reload_id
        if aborted:
            await self._drop_pending(name)
        else:
            self._cancelled.append(reload_id)
        return {"aborted": aborted}

    async def _op_reload(self, name: str, build: _Build, allow_interface_change: bool = False,
                         canary: bool | str = False) -> dict:
        """prepare + commit here, in one step (a rolling reload's, and a late joiner's catch-up)."""
        answer = await self._op_prepare(name, build, uuid.uuid4().hex, _EXPIRY_MARGIN, allow_interface_change,
                                        canary)
        committed = await self._op_commit(name, self._pending[name].reload_id)
        return {**answer, **committed}

    async def _op_rollback(self, name: str) -> dict:
        """Back to the build served before the last reload (``Registry.rollback``: the registry kept its bytes)."""
        before = self._loaded().get(name)
        module = await asyncio.to_thread(self._registry.rollback, name)
        previous = self._previous.pop(name, None)
        if previous is not None:
            self._switched(name, previous)
        return {"generation_before": before, "generation": module.generation}

    async def _op_unload(self, name: str) -> dict:
        before = self._loaded().get(name)
        await asyncio.to_thread(self._registry.unload, name)
        self._current.pop(name, None)
        self._previous.pop(name, None)
        self._sweep()
        return {"token": self.token, "generation_before": before}

    async def _op_status(self) -> dict:
        modules = []
        for m in self._registry.status():
            images = [{**i._asdict(), "handles": dict(i.handles)} for i in m.images]
            modules.append({**m._asdict(), "images": images})
        return {"modules": modules}

    # -- prepared reloads that nobody commits --------------------------------------------------

    def _expire(self, name: str, reload_id: str) -> None:
        task = asyncio.ensure_future(self._expire_locked(name, reload_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire_locked(self, name: str, reload_id: str) -> None:
        async with self._lock:
            pending = self._pending.get(name)
            if pending is not None and pending.reload_id == reload_id:
                await self._drop_pending(name, "because no commit or abort came (the client went away?)")

    async def _drop_pending(self, name: str, why: str = "") -> None:
        pending = self._pending.pop(name)
        pending.timer.cancel()
        if why:
            logger.warning("worker %s: aborting the prepared reload of '%s' %s", self._address, name, why)
        await asyncio.to_thread(pending.staged.abort)
        self._sweep()


async def _worker_op(op: str, kwargs: dict, dask_worker: Any = None) -> dict:
    """What ``Client.run`` runs on a worker: one operation of its plugin, under the plugin's lock.

    Never raises: a failure is the answer ``{"ok": False, "error": "Type: message"}`` (exceptions
    with keyword fields do not always survive pickling).
    """
    started = time.perf_counter()
    name = kwargs.get("name")
    try:
        plugin = await _plugin_of(dask_worker, kwargs.pop("wait_for_plugin", 0.0))
        async with plugin._lock:
            answer = await getattr(plugin, f"_op_{op}")(**kwargs)
        answer["ok"] = True
    except Exception as exc:
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        plugin = dask_worker.plugins.get(PLUGIN_NAME)
        if name is not None and isinstance(plugin, NativeReload) and plugin._registry is not None:
            with contextlib.suppress(Exception):        # what it still serves, for the report
                answer["generation_before"] = answer["generation"] = plugin._loaded().get(name)
    answer["seconds"] = time.perf_counter() - started
    return answer


async def _plugin_of(worker: Any, wait: float) -> NativeReload:
    deadline = time.monotonic() + wait
    while True:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if isinstance(plugin, NativeReload) and plugin._lock is not None:
            return plugin
        if time.monotonic() >= deadline:
            raise NativeReloadError(f"worker {worker.address} has no nativereload plugin — register it first: "
                                    "client.register_plugin(nativereload.dask.NativeReload({...}))")
        await asyncio.sleep(0.01)   # a worker that just joined: its plugins are being set up


# --------------------------------------------------------------------------- in a task

def registry() -> Registry:
    """The Registry of the worker running this task: how task code reaches its modules.

        def task(x):
            return nativereload.dask.registry().func("counter.add")(x, 1)

    Take Func handles inside the task (they are this process's, and cannot be pickled). They call
    the worker's current image, across cluster reloads.

    Raises:
        NativeReloadError: not called inside a Dask task, or the worker has no NativeReload plugin.
    """
    try:
        worker = distributed.get_worker()
    except ValueError:
        raise NativeReloadError("nativereload.dask.registry() is for code running in a Dask task on a worker — "
                                "outside one, make your own nativereload.Registry") from None
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, NativeReload) or plugin._registry is None:
        raise NativeReloadError(f"worker {worker.address} has no nativereload plugin set up — register it first: "
                                "client.register_plugin(nativereload.dask.NativeReload({...}))")
    return plugin._registry


def func(qualname: str) -> Any:
    """``registry().func(qualname)``: the worker's reload-safe handle on ``"module.symbol"``, in a task.

    Raises:
        as :func:`registry`, and ModuleNotLoaded, SymbolError as ``Registry.func``.
    """
    return registry().func(qualname)


# --------------------------------------------------------------------------- the report

class WorkerResult(NamedTuple):
    """What a cluster reload or unload did on one worker.

    Attributes:
        address: the worker's address.
        state: "switched" (serves the new build), "caught up" (joined during the reload and was
            switched after it), "refused" (could not take the build: see error), "aborted" (prepared,
            then aborted because another worker refused), "not reached" (a rolling reload stopped
            before it), "rolled back", "unloaded", or "failed" (no answer, or a commit that failed).
        generation_before, generation_after: the module's generation there (None: not loaded).
        seconds: the time the worker spent on it (None: it was not asked).
        error: why it refused or failed ("Type: message"), else None.
    """

    address: str
    state: str
    generation_before: int | None
    generation_after: int | None
    seconds: float | None
    error: str | None = None


_GOOD = ("switched", "caught up", "unloaded")


class ClusterReport:
    """The outcome of a cluster reload or unload: one :class:`WorkerResult` per worker.

    Attributes:
        module: the module's name.
        mode: "all-or-nothing", "rolling" or "unload".
        workers: the per-worker results, sorted by address (workers that joined meanwhile last).
        ok: every worker is on the new build (or unloaded it).
        seconds: from the call (lock included) to the last commit (or the end, when it failed).
        commit_window: all-or-nothing: the commit round as the client saw it, during which some
            workers serve the new build and some the old; None otherwise.
        commit_spread: all-or-nothing: the first to the last commit by the workers' own clocks
            (meaningful when their clocks agree, e.g. on one host); None otherwise.
        sha256: the SHA-256 of the build that was sent (None for unload).
    """

    def __init__(self, module: str, mode: str, workers: Iterable[WorkerResult], *, seconds: float,
                 commit_window: float | None = None, commit_spread: float | None = None,
                 sha256: str | None = None) -> None:
        self.module = module
        self.mode = mode
        self.workers = list(workers)
        self.seconds = seconds
        self.commit_window = commit_window
        self.commit_spread = commit_spread
        self.sha256 = sha256
        self.ok = bool(self.workers) and all(w.state in _GOOD for w in self.workers)

    def __repr__(self) -> str:
        return f"<nativereload.dask.ClusterReport {self.summary()}>"

    def count(self, state: str) -> int:
        return sum(w.state == state for w in self.workers)

    def summary(self) -> str:
        """One line: what happened, on how many workers, in how long."""
        n, took = len(self.workers), _ms(self.seconds)
        what = f"'{self.module}' on {n} worker{'s' * (n != 1)}"
        if self.mode == "unload":
            return f"unloaded {what} in {took}" if self.ok else \
                f"unload of {what} failed on {n - self.count('unloaded')} in {took}"
        if self.ok:
            window = f"; commits within {_ms(self.commit_window)}" if self.commit_window is not None else ""
            return f"reloaded {what} ({self.mode}) in {took}{window}"
        if self.mode == "all-or-nothing":
            return (f"reload of {what} refused by {n - self.count('aborted')} (all-or-nothing): no worker switched; "
                    f"{took}")
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("switched", "refused", "failed", "rolled back",
                                                            "not reached") if self.count(s))
        return f"rolling reload of {what} stopped: {counts}; {took}"

    def table(self, stream: Any = None) -> str:
        """The summary, then one row per worker: address, generation before → after, state, time, error."""
        to = arrow(stream if stream is not None else sys.stdout)
        rows = [("WORKER", "GENERATION", "STATE", "TIME", "ERROR")]
        for w in self.workers:
            error = (w.error or "").partition("\n")[0]
            rows.append((w.address, f"{_gen(w.generation_before)} {to} {_gen(w.generation_after)}", w.state,
                         _ms(w.seconds), error if len(error) <= 160 else error[:157] + "..."))
        return "\n".join([self.summary(), *_columns(rows)])

    __str__ = table

    def to_json(self) -> dict:
        """The report as one JSON-able document (what ``--json`` prints)."""
        return {"ok": self.ok, "module": self.module, "mode": self.mode, "summary": self.summary(),
                "sha256": self.sha256, "seconds": self.seconds, "commit_window": self.commit_window,
                "commit_spread": self.commit_spread, "workers": [w._asdict() for w in self.workers]}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _gen(generation: int | None) -> str:
    return "-" if generation is None else str(generation)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]).rstrip()
            for row in rows]


# --------------------------------------------------------------------------- across the cluster

def reload(client: distributed.Client, name: str, file: str | os.PathLike | bytes | None = None, *,
           mode: str = "all-or-nothing", batch: int = 1, rollback: bool = False, canary: bool | str = False,
           cdef: str | None = None, allow_interface_change: bool = False, timeout: float = 60.0) -> ClusterReport:
    """Reload module ``name`` in every worker of ``client``'s cluster; return the report.

    Args:
        file: the new build (a path on this machine, or its bytes); default: the file the module
            was registered or last reloaded from, read again here.
        mode: "all-or-nothing" (prepare on every worker, then commit everywhere or abort
            everywhere), or "rolling" (``batch`` workers at a time, prepare + commit, stopping at
            the first failure).
        rollback: rolling only: after a failure, take the workers already switched back.
        canary: passed to each worker's ``Registry.prepare``: the build is tried in a crash canary
            process on each worker first (True, or "package.module:function" to call there).
        cdef, allow_interface_change: as for ``Registry.reload``.
        timeout: seconds to wait for the module's lock, and for each round of messages.

    Returns:
        the ClusterReport (``.ok`` is True: every worker serves the new build).

    Raises:
        ClusterReloadError: a worker refused or failed (``.report`` says which and why; in
            all-or-nothing mode no worker switched), or the lock was not free within ``timeout``.
        ModuleNotFound, LoadError: ``file`` cannot be read. ValueError: bad mode, batch or rollback.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, not {batch!r}")
    if rollback and mode != "rolling":
        raise ValueError("rollback is for mode='rolling': an all-or-nothing reload never leaves a worker switched")
    started = time.perf_counter()
    options = {"allow_interface_change": allow_interface_change, "canary": canary}
    with _exclusive(client, name, timeout):
        workers = _workers(client, name)
        described = None
        if file is None or mode == "rolling":
            described = _run(client, workers, "describe", timeout)
        if file is None:
            file = _recorded_source(name, described)
        build = _Build.read(name, file, cdef)
        if mode == "rolling":
            report = _rolling(client, build, workers, described, int(batch), rollback, options, timeout, started)
        else:
            report = _all_or_nothing(client, build, workers, options, timeout, started)
    logger.info("%s", report.summary())
    if not report.ok:
        if report.count("switched"):
            hint = ("the workers marked switched serve the new build, the others the old one: fix the build and "
                    "reload again, or pass rollback=True (--rollback) to take them back")
        else:
            hint = "every worker serves its previous build: fix the build (or the workers that refused it), then " \
                   "reload again"
        raise ClusterReloadError(_failure_message(report), module=name, report=report, hint=hint)
    return report


def _all_or_nothing(client: Any, build: _Build, workers: list[str], options: dict, timeout: float,
                    started: float) -> ClusterReport:
    reload_id = uuid.uuid4().hex
    name = build.name
    prepared = _run(client, workers, "prepare", timeout, name=name, build=build, reload_id=reload_id,
                    expire=timeout + _EXPIRY_MARGIN, **options)
    if not all(a["ok"] for a in prepared.values()):
        aborted = _run(client, workers, "abort", timeout, name=name, reload_id=reload_id)
        rows = []
        for w in workers:
            p = prepared[w]
            if p["ok"]:
                a = aborted[w]
                error = None if a["ok"] else f"abort failed: {a['error']}"
                rows.append(WorkerResult(w, "aborted", p["generation_before"], p["generation_before"],
                                         p["seconds"] + (a["seconds"] or 0.0), error))
            else:
                rows.append(WorkerResult(w, "refused", p.get("generation_before"), p.get("generation_before"),
                                         p.get("seconds"), p["error"]))
        return ClusterReport(name, "all-or-nothing", rows, seconds=time.perf_counter() - started,
                             sha256=build.sha256)
    round_started = time.perf_counter()
    committed = _run(client, workers, "commit", timeout, name=name, reload_id=reload_id)
    window = time.perf_counter() - round_started
    rows = []
    for w in workers:
        p, c = prepared[w], committed[w]
        if c["ok"]:
            rows.append(WorkerResult(w, "switched", p["generation_before"], c["generation"],
                                     p["seconds"] + c["seconds"]))
        else:
            rows.append(WorkerResult(w, "failed", p["generation_before"], c.get("generation"), c.get("seconds"),
                                     f"commit failed: {c['error']}"))
    seconds = time.perf_counter() - started
    times = [c["committed_at"] for c in committed.values() if c["ok"]]
    if all(c["ok"] for c in committed.values()):
        _publish(client, build, committed.values())
        rows += _catch_up(client, build, workers, options, timeout)
    return ClusterReport(name, "all-or-nothing", rows, seconds=seconds, commit_window=window,
                         commit_spread=max(times) - min(times) if times else None, sha256=build.sha256)


def _rolling(client: Any, build: _Build, workers: list[str], described: dict, batch: int, rollback: bool,
             options: dict, timeout: float, started: float) -> ClusterReport:
    name = build.name
    rows: dict[str, WorkerResult] = {}
    for w in workers:
        d = described[w]
        generation = (d.get("modules") or {}).get(name, {}).get("generation") if d["ok"] else None
        rows[w] = WorkerResult(w, "not reached", generation, generation, None)
    switched: dict[str, dict] = {}       # worker -> its answer
    last = started
    for first in range(0, len(workers), batch):
        group = workers[first:first + batch]
        answers = _run(client, group, "reload", timeout, name=name, build=build, **options)
        last = time.perf_counter()
        for w in group:
            a = answers[w]
            if a["ok"]:
                rows[w] = WorkerResult(w, "switched", a["generation_before"], a["generation"], a["seconds"])
                switched[w] = a
            else:
                rows[w] = WorkerResult(w, "refused", a.get("generation_before", rows[w].generation_before),
                                       a.get("generation", rows[w].generation_before), a["seconds"], a["error"])
        if len(switched) < first + len(group):
            break
    if len(switched) == len(workers):
        _publish(client, build, switched.values())
        caught_up = _catch_up(client, build, workers, options, timeout)
        return ClusterReport(name, "rolling", [*rows.values(), *caught_up], seconds=last - started,
                             sha256=build.sha256)
    if rollback and switched:
        answers = _run(client, list(switched), "rollback", timeout, name=name)
        for w in switched:
            a = answers[w]
            before = rows[w]
            rows[w] = (WorkerResult(w, "rolled back", before.generation_before, a["generation"],
                                    before.seconds + a["seconds"]) if a["ok"] else
                       before._replace(error=f"rollback failed: {a['error']}"))
    return ClusterReport(name, "rolling", rows.values(), seconds=time.perf_counter() - started, sha256=build.sha256)


def _catch_up(client: Any, build: _Build, known: list[str], options: dict, timeout: float) -> list[WorkerResult]:
    """Bring workers that joined during the reload (and may have loaded the build before) to the new one.

    The new build is already published: a worker that joins from now on loads it by itself.
    """
    joined = sorted(set(client.nthreads()) - set(known))
    if not joined:
        return []
    described = _run(client, joined, "describe", timeout, wait_for_plugin=_PLUGIN_WAIT)
    rows = []
    behind = []
    for w in joined:
        d = described[w]
        serving = (d.get("modules") or {}).get(build.name) if d["ok"] else None
        if serving is not None and serving["sha256"] == build.sha256:
            rows.append(WorkerResult(w, "caught up", serving["generation"], serving["generation"], d["seconds"]))
        else:
            behind.append(w)
    answers = _run(client, behind, "reload", timeout, name=build.name, build=build, **options) if behind else {}
    for w, a in answers.items():
        rows.append(WorkerResult(w, "caught up", a["generation_before"], a["generation"], a["seconds"]) if a["ok"]
                    else WorkerResult(w, "failed", a.get("generation_before"), a.get("generation"), a["seconds"],
                                      f"joined during the reload, and then: {a['error']}"))
    return rows


def unload(client: distributed.Client, name: str, *, timeout: float = 60.0) -> ClusterReport:
    """Unload module ``name`` in every worker (calls in flight finish first); later workers do not load it.

    Raises:
        ClusterReloadError: a worker failed to unload it (``.report``), or the lock was not free in time.
    """
    started = time.perf_counter()
    with _exclusive(client, name, timeout):
        workers = _workers(client, name)
        answers = _run(client, workers, "unload", timeout, name=name)
        tokens = {a["token"] for a in answers.values() if a["ok"]}
        for token in tokens:
            client.set_metadata([_METADATA, token, name], None)
    rows = [WorkerResult(w, "unloaded", a["generation_before"], None, a["seconds"]) if a["ok"] else
            WorkerResult(w, "failed", a.get("generation_before"), a.get("generation"), a["seconds"], a["error"])
            for w, a in answers.items()]
    report = ClusterReport(name, "unload", rows, seconds=time.perf_counter() - started)
    if not report.ok:
        raise ClusterReloadError(_failure_message(report), module=name, report=report,
                                 hint="`nativereload status --dask ADDRESS` shows what each worker has loaded")
    logger.info("%s", report.summary())
    return report


class WorkerStatus(NamedTuple):
    """One worker's modules, as :func:`status` saw them.

    Attributes:
        address: the worker's address.
        modules: its ``Registry.status()``: the same ModuleStatus as locally.
        error: why the worker did not answer ("Type: message"), else None.
    """

    address: str
    modules: list[ModuleStatus]
    error: str | None = None


def status(client: distributed.Client, *, timeout: float = 60.0) -> list[WorkerStatus]:
    """Every worker's ``Registry.status()``, sorted by address."""
    answers = _run(client, sorted(client.nthreads()), "status", timeout)
    result = []
    for address, a in answers.items():
        if not a["ok"]:
            result.append(WorkerStatus(address, [], a["error"]))
            continue
        modules = [ModuleStatus(**{**m, "images": [ImageStatus(**{**i, "handles": MappingProxyType(i["handles"])})
                                                   for i in m["images"]]}) for m in a["modules"]]
        result.append(WorkerStatus(address, modules))
    return result


def status_table(statuses: list[WorkerStatus]) -> str:
    """The statuses as a table: one row per image, with the build (sha256) each worker serves."""
    rows = [("WORKER", "MODULE", "GEN", "IMAGE", "STATE", "IN FLIGHT", "SHA256", "HELD BY")]
    for s in statuses:
        if s.error:
            rows.append((s.address, "?", "", "", "", "", "", s.error.partition("\n")[0]))
        elif not s.modules:
            rows.append((s.address, "-", "", "", "", "", "", "no modules loaded"))
        for m in s.modules:
            for n, i in enumerate(m.images):
                rows.append((s.address if n == 0 else "", m.name if n == 0 else "", str(m.generation) if n == 0 else "",
                             str(i.generation), i.state, str(i.in_flight), i.sha256, i.held_by))
    return "\n".join(line[2:] for line in _columns(rows))


def status_json(statuses: list[WorkerStatus]) -> list[dict]:
    """The statuses as JSON-able dicts (what ``nativereload status --dask --json`` prints)."""
    return [{"address": s.address, "ok": s.error is None, "error": s.error,
             "modules": [{**m._asdict(), "images": [{**i._asdict(), "handles": dict(i.handles)} for i in m.images]}
                         for m in s.modules]} for s in statuses]


# --------------------------------------------------------------------------- internals

@contextlib.contextmanager
def _exclusive(client: Any, name: str, timeout: float) -> Any:
    """Hold the cluster-wide lock of module ``name`` (a Dask Lock on the scheduler)."""
    lock = distributed.Lock(f"nativereload:{name}", scheduler_rpc=client.scheduler, loop=client.loop)
    if not lock.acquire(timeout=timeout):
        raise ClusterReloadError(
            f"module '{name}': another cluster reload or unload of it held its lock (nativereload:{name}) for "
            f"{timeout:g} s", module=name, hint="wait for it to finish and try again, or pass a longer timeout")
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:      # the lease expired (the scheduler thought we were gone): nothing to release
            logger.warning("the lock nativereload:%s was no longer held when released", name, exc_info=True)
        # Its lease-refreshing callback runs on the client's loop, which keeps it (and the lock) alive.
        refresh = getattr(lock, "refresh_callback", None)
        if refresh is not None:
            client.loop.add_callback(refresh.stop)


def _workers(client: Any, name: str) -> list[str]:
    workers = sorted(client.nthreads())
    if not workers:
        raise ClusterReloadError(f"module '{name}': the cluster has no workers", module=name,
                                 hint="start workers (or wait for them), then try again")
    return workers


def _run(client: Any, workers: list[str], op: str, timeout: float, **kwargs: Any) -> dict[str, dict]:
    """One round of messages: ``op`` on each of ``workers`` through ``Client.run``; an answer for each.

    The arguments are pickled once; the scheduler sends them to every worker concurrently.
    """
    try:
        answers = client.run(_worker_op, op, kwargs, workers=list(workers), on_error="return",
                             callback_timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError):
        answers = {}
        missing = f"no answer within {timeout:g} s"
    else:
        missing = "no answer (the worker left the cluster?)"
    result = {}
    for w in workers:
        a = answers.get(w)
        if isinstance(a, dict):
            result[w] = a
        elif isinstance(a, BaseException):
            result[w] = {"ok": False, "error": f"{type(a).__name__}: {a}", "seconds": None}
        else:
            result[w] = {"ok": False, "error": missing, "seconds": None}
    return result


def _publish(client: Any, build: _Build, committed: Iterable[dict]) -> None:
    """Make ``build`` the one workers that join later load (scheduler metadata, per plugin token).

    ``committed``: the workers' answers, with their plugin's token and the cdef the build was loaded with.
    """
    published = set()
    for answer in committed:
        key = (answer["token"], answer["cdef"])
        if key not in published:
            published.add(key)
            client.set_metadata([_METADATA, answer["token"], build.name], build._replace(cdef=answer["cdef"])._asdict())


def _recorded_source(name: str, described: dict[str, dict]) -> str:
    sources = collections.Counter(d["modules"][name]["source"] for d in described.values()
                      if d["ok"] and name in d["modules"] and d["modules"][name]["source"])
    if not sources:
        raise ClusterReloadError(f"module '{name}': no file given, and no worker knows which file it was loaded "
                                 "from", module=name, hint="pass the new build: file=PATH (--file PATH)")
    source = sources.most_common(1)[0][0]
    if not os.path.isfile(source):
        raise ModuleNotFound(f"module '{name}' was loaded from {source}, which is not a file on this machine — "
                             "pass the new build: file=PATH (--file PATH)", module=name, searched=(source,))
    return source


def _failure_message(report: ClusterReport) -> str:
    lines = [report.summary()]
    for w in report.workers:
        if w.error:
            lines.append(f"  {w.address} {w.state}: {w.error}")
    return "\n".join(lines)
