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

Each part has its own module:

    plugin.py    the worker side: NativeReload (one Registry per worker), the operations that
                 Client.run runs there, and registry() / func() for task code
    cluster.py   the client side: reload, unload and status across every worker
    report.py    what those return: ClusterReport, WorkerResult, WorkerStatus, and their tables

distributed is imported here, not by ``import nativereload``: the package works without it.
"""

# Checked before the modules below import it, so that a missing extra says how to install it
# whichever of them would have needed it first.
try:
    import distributed  # noqa: F401
    from distributed.diagnostics.plugin import WorkerPlugin  # noqa: F401
except ImportError as _exc:      # the package imports without it; this subpackage does not
    raise ImportError('nativereload.dask needs Dask\'s distributed: pip install "nativereload[dask]"') from _exc

from .cluster import MODES, reload, status, unload
from .plugin import PLUGIN_NAME, NativeReload, func, registry
from .report import ClusterReport, WorkerResult, WorkerStatus, status_json, status_table

__all__ = ["ClusterReport", "MODES", "NativeReload", "PLUGIN_NAME", "WorkerResult", "WorkerStatus", "func",
           "registry", "reload", "status", "status_json", "status_table", "unload"]
