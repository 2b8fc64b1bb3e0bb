"""The worker side: the NativeReload plugin, the operations it runs there, and ``registry()`` for tasks.

Everything here runs in a worker process, except reading the files (``NativeReload.__init__``
and ``_Build.read``), which happens on the client. The client reaches a worker only through
:func:`_worker_op`, which ``Client.run`` calls there (``cluster._run``): an operation's name and
its keyword arguments in, one dict out, ``{"ok": True, ...}`` or ``{"ok": False, "error":
"Type: message"}``, with ``"seconds"``. Each operation is a ``NativeReload._op_NAME`` method and
runs under the plugin's lock, so operations on one worker never interleave.

The plugin instance is pickled to every worker, and ``_Build`` travels in the operations'
arguments: both must stay importable from this module on the workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Mapping, NamedTuple

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from .. import atomicfile
from ..errors import LoadError, ModuleNotFound, NativeReloadError
from ..registry import Registry

logger = logging.getLogger("nativereload")

PLUGIN_NAME = "nativereload"
_METADATA = "nativereload"       # scheduler metadata: [_METADATA, token, module] -> the current build (or None)
_EXPIRY_MARGIN = 60.0            # a prepared reload outlives its round's timeout by this much, then aborts itself


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
            try:
                atomicfile.write_bytes(path, build.data)
            except OSError as exc:
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
