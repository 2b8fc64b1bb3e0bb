"""Cluster reloads on a real Dask LocalCluster of worker processes (nativereload.dask).

One cluster serves the whole module (starting one costs seconds on 2 cores); each test
registers the plugin afresh, which makes every worker close its registry and load sample v1.
The workers' side is inspected only through Dask (Client.run), as on a real cluster.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from conftest import LIFECYCLE_CDEF, ROOT, SAMPLE_CDEF  # noqa: E402

import nativereload  # noqa: E402
from nativereload import cli  # noqa: E402
from nativereload import dask as nrdask  # noqa: E402
from nativereload.dask import cluster as nrcluster, plugin as nrplugin, report as nrreport  # noqa: E402

pytestmark = pytest.mark.timeout(240)

WORKERS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = tmp_path_factory.mktemp("dask")
    with distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=2, processes=True, dashboard_address=None,
                                  local_directory=str(local), silence_logs=40) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture
def plugin(client, cluster, samples):
    """The plugin registered afresh with sample v1 on exactly WORKERS workers; unregistered afterwards."""
    cluster.scale(WORKERS)
    _wait_for_workers(client, WORKERS)
    registered = nrdask.NativeReload({"sample": samples["v1"]}, cdef={"sample": SAMPLE_CDEF}, held_warning=None)
    client.register_plugin(registered)
    yield registered
    client.unregister_worker_plugin(nrdask.PLUGIN_NAME)


def _wait_for_workers(client, n, *, other_than=(), timeout=60.0):
    """Wait until exactly ``n`` workers are there, none of them in ``other_than``; return their addresses."""
    deadline = time.monotonic() + timeout
    while True:
        workers = sorted(client.nthreads())
        if len(workers) == n and not set(workers) & set(other_than):
            return workers
        assert time.monotonic() < deadline, f"workers: {workers}"
        time.sleep(0.05)


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def serving(client) -> dict[str, tuple[int, str]]:
    """Worker -> (generation, sha256 of the active image) of module sample."""
    found = {}
    for s in nrdask.status(client):
        assert s.error is None, s
        for m in s.modules:
            if m.name == "sample":
                active = [i for i in m.images if i.state == "active"]
                found[s.address] = (m.generation, active[0].sha256 if active else None)
    return found


def leftovers(client) -> dict[str, list[str]]:
    """Worker -> every file in its plugin's directory (relative), lock files aside."""
    def listing(dask_worker):
        top = Path(dask_worker.plugins[nrdask.PLUGIN_NAME]._directory)
        return sorted(str(p.relative_to(top)).split("/", 1)[0] + "/" + p.name
                      for p in top.rglob("*") if p.is_file() and p.name != ".lock")
    return client.run(listing)


def version_task(_):
    return nrdask.func("sample.version")()


# --------------------------------------------------------------------------- the plugin


def test_each_worker_process_has_its_own_registry_with_the_module(client, plugin):
    def where(_):
        reg = nrdask.registry()
        return os.getpid(), reg.func("sample.version")(), reg.call("sample.add", 2, 3)

    results = client.gather(client.map(where, range(12), pure=False))
    assert {(v, total) for _, v, total in results} == {(1, 5)}
    pids = set(client.run(os.getpid).values())
    assert {pid for pid, _, _ in results} <= pids and len(pids) == WORKERS
    # Copies live in each worker's own directory under its local directory, not on a shared path.
    dirs = client.run(lambda dask_worker: (dask_worker.plugins[nrdask.PLUGIN_NAME]._directory,
                                           dask_worker.local_directory))
    assert all(d.startswith(local + os.sep) for d, local in dirs.values())
    with pytest.raises(nativereload.NativeReloadError, match="Dask task"):
        nrdask.registry()


def test_unregistering_closes_every_registry_and_removes_its_directory(client, cluster, samples):
    client.register_plugin(nrdask.NativeReload({"sample": samples["v1"]}, cdef={"sample": SAMPLE_CDEF}))
    dirs = client.run(lambda dask_worker: dask_worker.plugins[nrdask.PLUGIN_NAME]._directory)
    assert all(client.run(os.path.isdir, d, workers=[w])[w] for w, d in dirs.items())
    client.unregister_worker_plugin(nrdask.PLUGIN_NAME)
    assert not any(client.run(os.path.exists, d, workers=[w])[w] for w, d in dirs.items())


# --------------------------------------------------------------------------- reloads under load


def long_caller(stop_name):
    """Call the module in a loop until the event is set; count each version seen."""
    stop = distributed.Event(stop_name)
    version = nrdask.func("sample.version")
    add = nrdask.func("sample.add")
    seen: dict[int, int] = {}
    checked = time.monotonic()
    while True:
        v = version()
        assert add(v, 1) == v + 1
        seen[v] = seen.get(v, 0) + 1
        if time.monotonic() - checked > 0.05:
            if stop.is_set():
                return seen
            checked = time.monotonic()


def test_twenty_reloads_while_tasks_call_continuously(client, plugin, samples):
    workers = sorted(client.nthreads())
    stop = distributed.Event(f"stop-{time.time_ns()}", client=client)
    long_tasks = [client.submit(long_caller, stop.name, workers=[w], allow_other_workers=False, pure=False)
                  for w in workers]
    short_results: list = []
    short_errors: list = []
    streaming = threading.Event()

    def stream():        # a stream of short tasks, on the workers' other thread
        while not streaming.is_set():
            try:
                short_results.extend(client.gather(client.map(version_task, range(6), pure=False)))
            except Exception as exc:     # any failure of a task fails the test below
                short_errors.append(exc)

    streamer = threading.Thread(target=stream)
    streamer.start()
    builds = [samples["v2"], samples["v1"]]
    try:
        for n in range(20):
            build = builds[n % 2]
            report = nrdask.reload(client, "sample", file=build)
            assert report.ok and report.mode == "all-or-nothing"
            assert [w.state for w in report.workers] == ["switched"] * WORKERS
            assert {w.generation_after for w in report.workers} == {n + 2}
            assert 0 <= report.commit_spread <= report.commit_window <= report.seconds
            assert serving(client) == {w: (n + 2, sha(build)[:12]) for w in workers}
    finally:
        stop.set()
        streaming.set()
        streamer.join()
    seen = client.gather(long_tasks)
    assert not short_errors
    assert set(short_results) <= {1, 2} and short_results
    for counts in seen:
        assert set(counts) == {1, 2}, seen       # each long task called both builds, and nothing else


# --------------------------------------------------------------------------- a build one worker refuses


@pytest.fixture
def lifecycle(client, cluster, samples):
    """The plugin with the lifecycle module (init/fini hooks: its counter carries on across reloads), v1."""
    cluster.scale(WORKERS)
    _wait_for_workers(client, WORKERS)
    client.register_plugin(nrdask.NativeReload({"lifecycle": samples["lifecycle1"]}, cdef={"lifecycle": LIFECYCLE_CDEF},
                                               held_warning=None))
    yield
    client.unregister_worker_plugin(nrdask.PLUGIN_NAME)


def _setenv(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture
def refusing_worker(client, lifecycle):
    """The middle worker, where the lifecycle module's init refuses version 2 (LIFECYCLE_REFUSE=2)."""
    worker = sorted(client.nthreads())[1]
    client.run(_setenv, "LIFECYCLE_REFUSE", "2", workers=[worker])
    yield worker
    client.run(_setenv, "LIFECYCLE_REFUSE", None, workers=[worker])


def counters(client) -> dict[str, int]:
    """Worker -> the lifecycle module's counter, one higher (it carries on across reloads there)."""
    return {w: client.submit(lambda _: nrdask.func("lifecycle.lifecycle_next")(), w, workers=[w], pure=False,
                             allow_other_workers=False).result() for w in sorted(client.nthreads())}


def serving_lifecycle(client) -> dict[str, tuple[int, str]]:
    return {s.address: (m.generation, [i.sha256 for i in m.images if i.state == "active"][0])
            for s in nrdask.status(client) for m in s.modules if m.name == "lifecycle"}


def test_all_or_nothing_refused_by_one_workers_init_leaves_every_worker_as_it_was(client, samples,
                                                                                  refusing_worker):
    assert set(counters(client).values()) == {1}
    before = serving_lifecycle(client)
    files = leftovers(client)
    with pytest.raises(nativereload.ClusterReloadError, match="refused by 1 ") as caught:
        nrdask.reload(client, "lifecycle", file=samples["lifecycle2"])
    report = caught.value.report
    assert not report.ok
    rows = {w.address: w for w in report.workers}
    assert rows[refusing_worker].state == "refused"
    assert rows[refusing_worker].error.startswith("InitRefused: ") and "version 2 will not start" in \
        rows[refusing_worker].error
    assert {w.state for a, w in rows.items() if a != refusing_worker} == {"aborted"}
    assert all(w.generation_before == w.generation_after == 1 for w in report.workers)
    assert serving_lifecycle(client) == before       # the old build everywhere, same generation
    assert leftovers(client) == files                # no copy, no received file left on any worker
    assert "prepared" not in {i.state for s in nrdask.status(client) for m in s.modules for i in m.images}
    assert set(counters(client).values()) == {2}     # the state every worker had carries on
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["ok"] is False and len(doc["workers"]) == WORKERS
    assert "refused" in report.table() and refusing_worker in report.table()


def test_rolling_stops_at_the_refusing_worker_and_can_roll_back(client, samples, refusing_worker):
    first, _, last = sorted(client.nthreads())
    assert set(counters(client).values()) == {1}
    with pytest.raises(nativereload.ClusterReloadError) as caught:
        nrdask.reload(client, "lifecycle", file=samples["lifecycle2"], mode="rolling", rollback=True)
    report = caught.value.report
    assert [(w.address, w.state, w.generation_before, w.generation_after) for w in report.workers] == [
        (first, "rolled back", 1, 3), (refusing_worker, "refused", 1, 1), (last, "not reached", 1, 1)]
    assert {s for _, s in serving_lifecycle(client).values()} == {sha(samples["lifecycle1"])[:12]}

    with pytest.raises(nativereload.ClusterReloadError) as caught:
        nrdask.reload(client, "lifecycle", file=samples["lifecycle2"], mode="rolling", batch=1)
    report = caught.value.report
    assert [(w.address, w.state, w.generation_before, w.generation_after) for w in report.workers] == [
        (first, "switched", 3, 4), (refusing_worker, "refused", 1, 1), (last, "not reached", 1, 1)]
    assert "1 switched, 1 refused, 1 not reached" in report.summary()
    assert serving_lifecycle(client) == {first: (4, sha(samples["lifecycle2"])[:12]),
                                         refusing_worker: (1, sha(samples["lifecycle1"])[:12]),
                                         last: (1, sha(samples["lifecycle1"])[:12])}
    assert set(counters(client).values()) == {2}     # on the first, across v2, the rollback to v1 and v2 again


def test_a_build_that_crashes_is_refused_by_every_workers_canary(client, cluster, samples, lifecycle, capsys):
    before = serving_lifecycle(client)
    with pytest.raises(nativereload.ClusterReloadError, match=f"refused by {WORKERS} ") as caught:
        nrdask.reload(client, "lifecycle", file=samples["lifecycle_crash"], canary=True)
    assert all(w.error.startswith("CanaryFailed: ") and "SIGSEGV" in w.error for w in caught.value.report.workers)
    assert cli.main(["reload", "lifecycle", "--dask", cluster.scheduler_address, "--file",
                     str(samples["lifecycle_crash"]), "--canary"]) == 1
    assert "CanaryFailed" in capsys.readouterr().err
    assert serving_lifecycle(client) == before       # no worker ever loaded it


def _limit_file_size(limit):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return soft


def test_a_worker_that_cannot_store_the_build_refuses_it_for_every_worker(client, plugin, samples):
    worker = sorted(client.nthreads())[2]
    files = leftovers(client)
    # That worker may write no file of 128 KiB or more; samples["big"] is 270 KB.
    before = client.run(_limit_file_size, 128 * 1024, workers=[worker])[worker]
    try:
        with pytest.raises(nativereload.ClusterReloadError, match="refused by 1 ") as caught:
            nrdask.reload(client, "sample", file=samples["big"])
    finally:
        client.run(_limit_file_size, before, workers=[worker])
    [refused] = [w for w in caught.value.report.workers if w.state == "refused"]
    assert refused.address == worker and "cannot store the new build" in refused.error
    assert "File too large" in refused.error
    assert {g for g, _ in serving(client).values()} == {1} and leftovers(client) == files


# --------------------------------------------------------------------------- workers that join later


def test_workers_that_join_later_load_the_current_build_not_the_registered_one(client, cluster, plugin, samples):
    nrdask.reload(client, "sample", file=samples["v2"])
    old = sorted(client.nthreads())
    cluster.scale(WORKERS + 1)
    joined, = set(_wait_for_workers(client, WORKERS + 1)) - set(old)
    assert serving(client)[joined] == (1, sha(samples["v2"])[:12])
    assert client.submit(version_task, 0, workers=[joined], pure=False).result() == 2

    # Unloaded across the cluster: a worker that joins afterwards does not load it.
    report = nrdask.unload(client, "sample")
    assert report.ok and {w.state for w in report.workers} == {"unloaded"}
    cluster.scale(WORKERS + 2)
    second, = set(_wait_for_workers(client, WORKERS + 2)) - set(old) - {joined}
    assert joined not in serving(client) and second not in serving(client)
    assert {s.address: s.modules for s in nrdask.status(client)}[second] == []


def test_a_killed_worker_comes_back_through_its_nanny_with_the_current_build(client, plugin, samples):
    nrdask.reload(client, "sample", file=samples["v2"])
    victim = sorted(client.nthreads())[0]
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    workers = _wait_for_workers(client, WORKERS, other_than=[victim])
    assert set(serving(client)) == set(workers)
    assert {s for _, s in serving(client).values()} == {sha(samples["v2"])[:12]}
    assert set(client.gather(client.map(version_task, range(9), pure=False))) == {2}


# --------------------------------------------------------------------------- one reload at a time


def test_two_concurrent_cluster_reloads_do_not_mix_builds(client, cluster, plugin, samples):
    reports: dict = {}
    start = threading.Barrier(2)

    def run(build):
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as own:
            start.wait()
            reports[build] = nrdask.reload(own, "sample", file=samples[build])

    threads = [threading.Thread(target=run, args=(b,)) for b in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(reports) == {"v2", "v3"}
    first, second = sorted(reports.values(), key=lambda r: r.workers[0].generation_after)
    assert [(w.generation_before, w.generation_after) for w in first.workers] == [(1, 2)] * WORKERS
    assert [(w.generation_before, w.generation_after) for w in second.workers] == [(2, 3)] * WORKERS
    assert {s for _, s in serving(client).values()} == {second.sha256[:12]}


def test_a_reload_waits_for_the_lock_and_gives_up_after_its_timeout(client, plugin, samples):
    lock = distributed.Lock("nativereload:sample", scheduler_rpc=client.scheduler, loop=client.loop)
    assert lock.acquire(timeout=5)
    try:
        with pytest.raises(nativereload.ClusterReloadError, match="held its lock"):
            nrdask.reload(client, "sample", file=samples["v2"], timeout=0.5)
    finally:
        lock.release()
    assert {g for g, _ in serving(client).values()} == {1}


def test_a_prepared_reload_nobody_commits_aborts_itself_on_the_worker(client, plugin, samples):
    workers = sorted(client.nthreads())
    files = leftovers(client)
    build = nrplugin._Build.read("sample", samples["v2"], None)
    answers = nrcluster._run(client, workers, "prepare", 30, name="sample", build=build, reload_id="gone",
                             expire=0.3)
    assert all(a["ok"] for a in answers.values())
    assert {i.state for s in nrdask.status(client) for m in s.modules for i in m.images} == {"active", "prepared"}
    deadline = time.monotonic() + 30
    while {i.state for s in nrdask.status(client) for m in s.modules for i in m.images} != {"active"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert leftovers(client) == files
    assert nrdask.reload(client, "sample", file=samples["v2"]).ok


def test_arguments_are_checked_before_anything_is_sent(client, plugin, samples):
    with pytest.raises(ValueError, match="mode"):
        nrdask.reload(client, "sample", file=samples["v2"], mode="sideways")
    with pytest.raises(ValueError, match="rollback"):
        nrdask.reload(client, "sample", file=samples["v2"], rollback=True)
    with pytest.raises(nativereload.ModuleNotFound):
        nrdask.reload(client, "sample", file=samples["v2"].with_name("missing.so"))
    with pytest.raises(ValueError, match="cdef given for other"):
        nrdask.NativeReload({"sample": samples["v1"]}, cdef={"other": "int f(void);"})
    # With no file: the one the module was registered from, read again here.
    assert nrdask.reload(client, "sample").workers[0].generation_after == 2


# --------------------------------------------------------------------------- the command line


def test_the_command_line_reloads_and_shows_the_cluster(client, cluster, plugin, samples, capsys):
    address = cluster.scheduler_address
    assert cli.main(["reload", "sample", "--dask", address, "--file", str(samples["v2"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["mode"] == "all-or-nothing" and len(doc["workers"]) == WORKERS
    assert cli.main(["status", "--dask", address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["generation"] for w in doc for m in w["modules"]] == [2] * WORKERS
    assert cli.main(["reload", "sample", "--dask", address, "--file", str(samples["undef"]), "--rolling",
                     "--batch", "2"]) == 1
    out, err = capsys.readouterr()
    assert "refused" in out and "not reached" in out and err.startswith("error: rolling reload of 'sample'")
    assert "hint:" in err
    assert cli.main(["reload", "sample", "--rolling", "--file", "x.so"]) == 2        # no --dask
    assert cli.main(["reload", "sample", "--dask", address, "--batch", "2"]) == 2     # --batch without --rolling
    assert cli.main(["reload", "sample", "--dask", address, "--pid", "1"]) == 2
    capsys.readouterr()

    # End to end, as from a laptop: the real command, its own process, the scheduler's address.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "nativereload", "reload", "sample", "--dask", address, "--file",
                           str(samples["v1"])], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reloaded 'sample' on {WORKERS} workers (all-or-nothing)")
    done = subprocess.run([sys.executable, "-m", "nativereload", "status", "--dask", address],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.count(" sample ") == WORKERS, done.stdout + done.stderr
    assert serving(client) == {w: (3, sha(samples["v1"])[:12]) for w in sorted(client.nthreads())}


def test_an_unreachable_scheduler_is_an_error_not_a_traceback(capsys):
    assert cli.main(["status", "--dask", "tcp://127.0.0.1:9", "--timeout", "1", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "tcp://127.0.0.1:9" in doc["error"]["message"]


def test_the_public_api_is_listed_and_documented():
    # Users import from the package: whatever its modules define for them, it re-exports and lists.
    modules = {m.__name__: m for m in (nrdask, nrcluster, nrplugin, nrreport)}
    public = {name for module in modules.values() for name, value in vars(module).items() if not name.startswith("_")
              and getattr(value, "__module__", nrdask.__name__) in modules and callable(value)}
    assert public <= set(nrdask.__all__) and sorted(nrdask.__all__) == nrdask.__all__
    for name in nrdask.__all__:
        assert getattr(nrdask, name).__doc__ or name in ("MODES", "PLUGIN_NAME"), name


def test_the_package_imports_without_distributed():
    code = ("import sys; sys.modules['distributed'] = None\n"
            "import nativereload, nativereload.cli\n"
            "from nativereload.cli import main\n"
            "sys.exit(main(['status', '--dask', 'tcp://127.0.0.1:9']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and 'pip install "nativereload[dask]"' in done.stderr, done.stderr
