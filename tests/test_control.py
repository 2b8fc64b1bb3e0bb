"""The control socket: a real child process hosting a Registry with serve(), real sockets.

``ServingChild`` is also used by test_cli.py and test_watch.py: a Python
process that loads ``sample`` from a module directory, serves its registry,
keeps a thread calling it, and answers "calls" / "quit" on stdin with JSON.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CDEF, install

from nativereload import Registry, cli, control

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import nativereload

    moddir, socket_path, name, cdef = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
    process_name = sys.argv[5] if len(sys.argv) > 5 else None
    reg = nativereload.Registry(path=[moddir])
    mod = reg.load(name, cdef=cdef)
    server = reg.serve(socket_path, name=process_name)
    served, failed, last = [0], [], [None]
    stop = threading.Event()

    def caller():
        version = mod.version
        while not stop.is_set():
            try:
                last[0] = version()
                served[0] += 1
            except Exception as exc:
                failed.append(repr(exc))
            if served[0] % 1000 == 0:
                # A breath now and then: with the GIL off this thread would take a
                # whole core, and three such children starve the CLI processes a test
                # runs beside them (3.13t's own import yields thousands of times).
                time.sleep(0.001)

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    print(json.dumps({"pid": __import__("os").getpid(), "socket": str(server.path)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "calls":
            # Two more calls: the second began after this command, so after
            # whatever the test did before asking (a call already running may
            # still return the old version).
            before = served[0]
            while served[0] < before + 2 and thread.is_alive():
                pass
            print(json.dumps({"served": served[0], "failed": failed, "version": last[0],
                              "generation": mod.generation}), flush=True)
        elif line.strip() == "quit":
            break
    stop.set()
    thread.join()
    reg.close()
    print(json.dumps({"closed": True, "socket_exists": __import__("os").path.exists(str(server.path))}),
          flush=True)
""")


def child_env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    # The child's private copies go there too: a child the test kills with
    # SIGKILL cannot remove them, and they must not be left in the real /tmp.
    env["TMPDIR"] = str(runtime_dir)
    env.update(extra)
    return env


class ServingChild:
    """A child Python process hosting a Registry with ``serve()``; always reaped by ``stop()``."""

    def __init__(self, moddir: Path, runtime_dir: Path, *, socket_path: Path | None = None, name: str = "sample",
                 cdef: str = SAMPLE_CDEF, process_name: str | None = None) -> None:
        self.argv = [str(moddir), str(socket_path or ""), name, cdef, *([process_name] if process_name else [])]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *self.argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_env(runtime_dir))
        ready = self._line(timeout=30)
        self.pid: int = ready["pid"]
        self.socket = Path(ready["socket"])

    def _line(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"child gave no answer (exit {self.proc.returncode}): {err}")
        return json.loads(line)

    def calls(self) -> dict:
        """The child's own view: calls served and failed, the version its last call returned."""
        self.proc.stdin.write("calls\n")
        self.proc.stdin.flush()
        return self._line(timeout=30)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        result = self._line(timeout=30)
        self.proc.wait(timeout=30)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def runtime_dir(short_tmp_path, monkeypatch) -> Path:
    """A private XDG_RUNTIME_DIR for this test, for the children and for in-process clients."""
    path = short_tmp_path / "run"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def spawn(moddir, runtime_dir, samples):
    """``spawn(version="v1", **kw) -> ServingChild`` with sample installed in ``moddir``; children reaped."""
    children = []

    def start(version: str = "v1", **kw) -> ServingChild:
        if not (moddir / "sample.so").exists():
            install(samples[version], moddir / "sample.so")
        child = ServingChild(moddir, runtime_dir, **kw)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def raw(path: Path, data: bytes, *, timeout: float = 10) -> list[dict]:
    """Send raw bytes; read replies until the server closes or stops answering."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buffer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buffer += chunk
    return [json.loads(line) for line in buffer.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- where and how it listens

def test_default_socket_path_from_environment(monkeypatch, short_tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp_path / "xdg"))
    assert control.default_socket_path(42) == short_tmp_path / "xdg" / "nativereload" / "42.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(short_tmp_path / "t"))
    assert control.default_socket_path(42) == short_tmp_path / "t" / f"nativereload-sockets-{os.getuid()}" / "42.sock"
    monkeypatch.delenv("TMPDIR")
    assert control.default_socket_dir() == Path("/tmp") / f"nativereload-sockets-{os.getuid()}"


@pytest.mark.timeout(60)
def test_child_serves_at_default_path_private(spawn, runtime_dir):
    child = spawn()
    assert child.socket == runtime_dir / "nativereload" / f"{child.pid}.sock"
    assert stat.S_ISSOCK(os.lstat(child.socket).st_mode)
    assert stat.S_IMODE(os.lstat(child.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(child.socket.parent).st_mode) == 0o700
    assert os.lstat(child.socket.parent).st_uid == os.geteuid()
    # Only the socket: the staging directory it was bound in is gone.
    assert sorted(p.name for p in child.socket.parent.iterdir()) == [f"{child.pid}.sock"]
    assert control.discover() == [control.Target(child.pid, child.socket)]
    closed = child.quit()
    assert closed == {"closed": True, "socket_exists": False}
    assert not child.socket.exists()


@pytest.mark.timeout(60)
def test_tmpdir_fallback_when_no_runtime_dir(moddir, samples, short_tmp_path):
    install(samples["v1"], moddir / "sample.so")
    tmp = short_tmp_path / "tmp"
    tmp.mkdir()
    env = child_env(short_tmp_path, TMPDIR=str(tmp))
    del env["XDG_RUNTIME_DIR"]
    code = ("import nativereload, os, stat; r = nativereload.Registry(path=[%r]); r.load('sample', cdef=%r); "
            "s = r.serve(); print(s.path); print(oct(stat.S_IMODE(os.stat(s.path.parent).st_mode))); r.close(); "
            "print(os.path.exists(s.path))") % (str(moddir), SAMPLE_CDEF)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    path, mode, exists = out.stdout.split()
    assert Path(path).parent == tmp / f"nativereload-sockets-{os.getuid()}"
    assert mode == "0o700" and exists == "False"


@pytest.mark.timeout(60)
def test_socket_removed_at_interpreter_exit(moddir, samples, short_tmp_path):
    install(samples["v1"], moddir / "sample.so")
    code = ("import nativereload; r = nativereload.Registry(path=[%r]); r.load('sample', cdef=%r); "
            "print(r.serve().path)") % (str(moddir), SAMPLE_CDEF)
    out = subprocess.run([sys.executable, "-c", code], env=child_env(short_tmp_path), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).exists()


FORK = textwrap.dedent("""
    import json, os, sys
    import nativereload
    from nativereload import control

    reg = nativereload.Registry()
    server = reg.serve()
    pid = os.fork()
    if pid == 0:
        # A pre-fork server's worker: serves on its own socket, then exits
        # normally (atexit runs) -- it must not take the parent's socket along.
        mine = reg.serve()
        print(json.dumps({"worker": str(mine.path)}), flush=True)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    alive = server.path.exists() and control.request(server.path, "ping")["ok"]
    reg.close()
    print(json.dumps({"parent": str(server.path), "worker_status": status, "parent_serving": alive,
                      "removed": not server.path.exists()}), flush=True)
""")


@pytest.mark.timeout(60)
def test_forked_worker_leaves_the_parents_socket_alone(short_tmp_path):
    runtime = short_tmp_path / "run"
    runtime.mkdir(mode=0o700)
    out = subprocess.run([sys.executable, "-c", FORK], env=child_env(runtime), capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    worker, parent = (json.loads(line) for line in out.stdout.splitlines())
    assert parent["worker_status"] == 0
    assert parent["parent_serving"] and parent["removed"]
    assert worker["worker"] != parent["parent"]
    assert not Path(worker["worker"]).exists()
    assert "Traceback" not in out.stderr, out.stderr


def test_server_close_and_registry_close_remove_socket(runtime_dir, short_tmp_path):
    with Registry() as reg:
        server = reg.serve()
        assert server.path.exists()
        server.close()
        server.close()
        assert not server.path.exists()
        explicit = reg.serve(short_tmp_path / "explicit.sock")
        assert control.request(explicit.path, "ping")["ok"]
    assert not explicit.path.exists()
    assert explicit.closed


def test_stale_sockets_replaced_and_swept(runtime_dir):
    directory = runtime_dir / "nativereload"
    directory.mkdir(mode=0o700)
    # A socket nobody listens on at our own path (a dead process with our pid).
    dead_listener = socket.socket(socket.AF_UNIX)
    dead_listener.bind(str(directory / f"{os.getpid()}.sock"))
    dead_listener.close()
    # The socket of a process that is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(directory / f"{dead_pid}.sock"))
    other.close()
    with Registry() as reg:
        server = reg.serve()
        assert control.request(server.path, "ping")["pid"] == os.getpid()
        assert not (directory / f"{dead_pid}.sock").exists()


def test_live_socket_is_not_replaced(runtime_dir, short_tmp_path):
    with Registry() as reg:
        first = reg.serve(short_tmp_path / "s.sock")
        with pytest.raises(control.ControlError, match="in use"):
            reg.serve(short_tmp_path / "s.sock")
        assert control.request(first.path, "ping")["ok"]
        (short_tmp_path / "file").write_text("not a socket")
        with pytest.raises(control.ControlError, match="in use"):
            reg.serve(short_tmp_path / "file")
        assert (short_tmp_path / "file").read_text() == "not a socket"


@pytest.fixture
def shared_tmp(short_tmp_path, monkeypatch) -> Path:
    """A shared, sticky TMPDIR (like /tmp) and no XDG_RUNTIME_DIR: the place where names can be squatted."""
    path = short_tmp_path / "tmp"
    path.mkdir()
    os.chmod(path, 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def _check_serves_beside_a_squatted_dir(squatted: Path, caplog, others: tuple[str, ...] = ()) -> None:
    caplog.set_level(logging.WARNING, logger="nativereload")
    with Registry() as reg:
        server = reg.serve()
        fallback = server.path.parent
        assert fallback.parent == squatted.parent and fallback.name.startswith(squatted.name + ".")
        st = os.lstat(fallback)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert control.request(server.path, "ping")["ok"]
        assert control.discover() == [control.Target(os.getpid(), server.path)]
        warning = "\n".join(r.getMessage() for r in caplog.records)
        assert f"serving from {fallback} instead" in warning and f"have {squatted} removed" in warning
        # The command line finds it too.
        assert cli.main(["status", "--json"]) == 0
        server.close()
        # The next server reuses the fallback rather than making another.
        again = reg.serve()
        assert again.path.parent == fallback
    assert sorted(p.name for p in squatted.parent.iterdir()) == sorted([squatted.name, fallback.name, *others])


def test_a_squatted_socket_name_does_not_stop_serve(shared_tmp, caplog, capsys):
    """Anyone can create the usual name first in a sticky /tmp; here, a file (no second user needed)."""
    squatted = shared_tmp / f"nativereload-sockets-{os.getuid()}"
    squatted.write_text("mine now")
    _check_serves_beside_a_squatted_dir(squatted, caplog)
    assert squatted.read_text() == "mine now"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another user")
def test_a_socket_directory_owned_by_someone_else_is_never_used(shared_tmp, caplog, capsys):
    squatted = shared_tmp / f"nativereload-sockets-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    # A fallback-looking directory of the other user is not trusted either.
    theirs = shared_tmp / f"nativereload-sockets-{os.getuid()}.aaaa"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    _check_serves_beside_a_squatted_dir(squatted, caplog, others=(theirs.name,))
    assert list(squatted.iterdir()) == [] and list(theirs.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another user")
def test_an_explicit_path_in_a_directory_of_someone_else_is_refused(runtime_dir, short_tmp_path):
    with Registry() as reg:
        shared = short_tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        os.chown(shared, 65534, 65534)
        with pytest.raises(control.ControlError):
            reg.serve(shared / "x.sock")
        assert list(shared.iterdir()) == []


def test_explicit_path_parent_must_be_private(runtime_dir, short_tmp_path):
    shared = short_tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with Registry() as reg:
        with pytest.raises(control.ControlError, match="writable by nobody else"):
            reg.serve(shared / "x.sock")
        # A missing parent is created private; an existing one of ours (0755) is fine.
        server = reg.serve(short_tmp_path / "new" / "x.sock")
        assert stat.S_IMODE(os.stat(short_tmp_path / "new").st_mode) == 0o700
        os.chmod(short_tmp_path / "new", 0o755)
        assert reg.serve(short_tmp_path / "new" / "y.sock").path.exists()
        server.close()
    assert list(shared.iterdir()) == []


def test_a_symlinked_socket_directory_is_never_followed(runtime_dir, short_tmp_path):
    target = short_tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (runtime_dir / "nativereload").symlink_to(target)
    with Registry() as reg:
        server = reg.serve()
        assert server.path.parent.name.startswith("nativereload.") and not server.path.parent.is_symlink()
    assert list(target.iterdir()) == []


# ----------------------------------------------------------------------------- protocol

@pytest.mark.timeout(60)
def test_protocol_against_a_serving_child(spawn, samples, moddir):
    child = spawn()
    assert control.request(child.socket, "ping") == {"ok": True, "pid": child.pid, "name": "python",
                                                     "argv": [sys.executable, "-c", CHILD, *child.argv]}
    status = control.request(child.socket, "status")
    assert status["ok"] and status["pid"] == child.pid
    (module,) = status["modules"]
    assert module["name"] == "sample" and module["generation"] == 1
    assert module["path"] == str(moddir / "sample.so")
    image = module["images"][0]
    assert module["images"] == [{"generation": 1, "state": "active", "in_flight": image["in_flight"], "pins": 0,
                                 "handles": {}, "pointer_results": 0, "held_by": image["held_by"]}]

    install(samples["v2"], moddir / "sample.so")
    reply = control.request(child.socket, "reload", module="sample")
    assert reply["ok"] and reply["generation_before"] == 1 and reply["generation"] == 2
    assert reply["seconds"] >= 0
    assert child.calls()["version"] == 2

    missing = control.request(child.socket, "reload", module="nosuch")
    assert missing == {"ok": False, "error": {"type": "ModuleNotLoaded", "message": missing["error"]["message"]}}
    assert "nosuch" in missing["error"]["message"]

    install(samples["nosym"], moddir / "sample.so")
    refused = control.request(child.socket, "reload", module="sample")
    assert not refused["ok"] and refused["error"]["type"] == "SymbolError"
    assert "scaled" in refused["error"]["message"]
    calls = child.calls()
    assert calls["version"] == 2 and calls["generation"] == 2 and calls["failed"] == []

    assert control.request(child.socket, "unload", module="sample") == {
        "ok": True, "pid": child.pid, "module": "sample", "generation": 2}
    assert control.request(child.socket, "reload", module="sample")["error"]["type"] == "ModuleNotLoaded"


@pytest.mark.timeout(60)
def test_bad_requests_get_error_replies_and_server_goes_on(spawn):
    child = spawn()
    replies = raw(child.socket, b"not json\n[1, 2]\n{\"op\": \"eval\", \"code\": \"1\"}\n{\"op\": 7}\n"
                                b"{\"op\": \"reload\"}\n{\"op\": \"reload\", \"module\": 3}\n"
                                b"{\"op\": \"reload\", \"module\": \"sample\", \"path\": \"/etc/x.so\"}\n"
                                b"\xff\xfe\n{\"op\": \"ping\"}\n")
    assert [r["ok"] for r in replies] == [False] * 8 + [True]
    assert all(set(r["error"]) == {"type", "message"} for r in replies[:8])
    assert "invalid JSON" in replies[0]["error"]["message"]
    assert "unknown op 'eval'" in replies[2]["error"]["message"]
    assert "path" in replies[6]["error"]["message"]
    # The refused reload with a path did not reload anything.
    assert control.request(child.socket, "status")["modules"][0]["generation"] == 1


@pytest.mark.timeout(60)
def test_huge_request_is_refused_and_connection_closed(spawn):
    child = spawn()
    replies = raw(child.socket, b"{\"op\": \"ping\", \"x\": \"" + b"a" * (control.MAX_REQUEST + 10) + b"\"}\n"
                                b"{\"op\": \"ping\"}\n")
    assert len(replies) == 1 and not replies[0]["ok"]
    assert "longer than" in replies[0]["error"]["message"]
    # Without a newline at all, too.
    replies = raw(child.socket, b"x" * (control.MAX_REQUEST * 2))
    assert len(replies) == 1 and not replies[0]["ok"]
    # Far more than a socket buffer: the client's sendall() completes, and it
    # reads the error reply and then end-of-file (no EPIPE, no ECONNRESET).
    replies = raw(child.socket, b"{\"op\": \"ping\", \"x\": \"" + b"a" * (4 << 20) + b"\"}\n")
    assert len(replies) == 1 and replies[0]["error"]["type"] == "ProtocolError"
    assert control.request(child.socket, "ping")["ok"]


@pytest.mark.timeout(60)
def test_idle_connections_do_not_delay_others(spawn):
    child = spawn()
    idle = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(child.socket))
        idle.append(s)
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(child.socket))
    half.sendall(b"{\"op\": \"pi")  # a request that never ends
    try:
        for _ in range(3):
            assert control.request(child.socket, "status", timeout=10)["ok"]
    finally:
        for s in idle + [half]:
            s.close()


@pytest.mark.timeout(60)
def test_more_silent_clients_than_the_connection_limit_do_not_lock_others_out(spawn):
    child = spawn()
    silent = []
    try:
        for _ in range(control.MAX_CONNECTIONS + 20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(child.socket))
            silent.append(s)
        for _ in range(3):
            assert control.request(child.socket, "ping", timeout=10)["ok"]
    finally:
        for s in silent:
            s.close()


def test_deeply_nested_json_gets_an_error_reply(spawn):
    child = spawn()
    replies = raw(child.socket, b"[" * 30000 + b"]" * 30000 + b"\n{\"op\": \"ping\"}\n")
    assert [r["ok"] for r in replies] == [False, True]
    # Python < 3.14: RecursionError, "invalid JSON"; 3.14's json parses it: "must be a JSON object".
    assert replies[0]["error"]["type"] == "ProtocolError"
    assert "invalid JSON" in replies[0]["error"]["message"] or "JSON object" in replies[0]["error"]["message"]


def test_serves_in_a_process_with_descriptors_above_1024(moddir, samples, short_tmp_path, runtime_dir):
    install(samples["v1"], moddir / "sample.so")
    code = textwrap.dedent(f"""
        import json, os, sys
        import nativereload
        from nativereload import control
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]    # select() would fail past 1023
        with nativereload.Registry(path=[{str(moddir)!r}]) as reg:
            reg.load("sample", cdef="int version(void);")
            server = reg.serve()
            print(json.dumps(control.request(server.path, "status")))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=child_env(runtime_dir))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] and reply["modules"][0]["name"] == "sample"
    assert "no longer serving" not in result.stderr


@pytest.mark.timeout(60)
def test_idle_connection_is_dropped(runtime_dir):
    with Registry() as reg:
        server = control.serve(reg, request_timeout=0.5)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(server.path))
            assert s.recv(100) == b""  # the server hung up, with nothing to say to a silent client
        assert control.request(server.path, "ping")["ok"]


@pytest.mark.timeout(60)
def test_a_request_must_complete_within_the_deadline_not_just_an_idle_gap(runtime_dir):
    """One byte every 0.2 s never leaves the connection idle for 1 s, but the whole request takes longer."""
    with Registry() as reg:
        server = control.serve(reg, request_timeout=1.0)
        request = b'{"op": "ping", "pad": "' + b"x" * 40 + b'"}\n'
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(server.path))
            started = time.monotonic()
            received = b""
            for byte in request:
                try:
                    s.sendall(bytes([byte]))
                except OSError:      # the server closed: expected
                    break
                readable, _, _ = select.select([s], [], [], 0.2)
                if readable:
                    received = s.recv(4096)
                    break
            elapsed = time.monotonic() - started
        (reply,) = [json.loads(line) for line in received.splitlines()]
        assert reply["ok"] is False and "not complete within 1 s" in reply["error"]["message"]
        assert 0.9 < elapsed < 3.0, elapsed
        # A client that sends its requests promptly is served, one request after another.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(server.path))
            for _ in range(3):
                time.sleep(0.6)       # 1.8 s on one connection: the deadline is per request
                s.sendall(b'{"op": "ping"}\n')
                assert json.loads(s.recv(4096))["ok"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_requests_are_utf8_only(runtime_dir, encoding):
    with Registry() as reg:
        server = reg.serve()
        replies = raw(server.path, '{"op": "ping"}'.encode(encoding) + b"\n" + b'{"op": "ping"}\n')
        assert replies[0]["ok"] is False and replies[0]["error"]["type"] == "ProtocolError"
        assert "UTF-8" in replies[0]["error"]["message"]
        assert replies[-1]["ok"] and replies[-1]["pid"] == os.getpid()
        # UTF-8 itself, non-ASCII included, is fine (an unknown module, named in the error).
        (reply,) = raw(server.path, '{"op": "reload", "module": "m\u00f6d"}\n'.encode())
        assert reply["error"]["type"] == "ModuleNotLoaded" and "m\u00f6d" in reply["error"]["message"]


@pytest.mark.timeout(60)
def test_a_reload_whose_client_is_gone_before_it_starts_is_not_run(runtime_dir, moddir, samples, monkeypatch,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="nativereload")
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir]) as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
        server = reg.serve()
        release, started, reloads = threading.Event(), threading.Event(), []
        real_reload = reg.reload

        def slow_reload(name, cdef=None, **options):
            reloads.append(name)
            if len(reloads) == 1:
                started.set()
                release.wait(30)        # a slow reload: the next one queues behind it
            return real_reload(name, cdef, **options)

        monkeypatch.setattr(reg, "reload", slow_reload)
        first: list[dict] = []
        waiter = threading.Thread(target=lambda: first.append(control.request(server.path, "reload",
                                                                              module="sample")))
        waiter.start()
        assert started.wait(10)
        # A second client asks for a reload, gives up (as the CLI does at its timeout) and hangs up.
        with pytest.raises(control.ControlError, match="no reply"):
            control.request(server.path, "reload", module="sample", timeout=0.5)
        # A third client that hung up only its sending side still waits for its reply: it is served.
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(server.path))
        third.sendall(b'{"op": "unload", "module": "sample"}\n')
        third.shutdown(socket.SHUT_WR)
        release.set()
        waiter.join(10)
        assert first[0]["ok"] and first[0]["generation"] == 2
        third.settimeout(10)
        assert json.loads(third.recv(4096)) == {"ok": True, "pid": os.getpid(), "module": "sample",
                                                "generation": 2}
        third.close()
        deadline = time.monotonic() + 10      # the lock does not say which waiter goes first
        while not any("reload of 'sample' not run: its client hung up" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        assert reloads == ["sample"]


# ----------------------------------------------------------------------------- another user

OTHER_USER = "nrtestpeer"

PEER_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": type(exc).__name__}))
    raise SystemExit(0)
s.sendall(b'{"op": "status"}\\n')
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(json.dumps({"connect": "ok", "reply": json.loads(data) if data else None}))
"""


@pytest.fixture(scope="module")
def other_user():
    """(uid, gid, python) of a second, unprivileged user; created here when running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user")
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True)
        entry = pwd.getpwnam(OTHER_USER)
    # The interpreter running the tests may live under a private home directory.
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            ok = subprocess.run([python, "-c", "pass"], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                                capture_output=True, timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return entry.pw_uid, entry.pw_gid, python
    pytest.skip(f"no Python interpreter the user {OTHER_USER} can run")


def as_other(other_user, path: Path) -> dict:
    uid, gid, python = other_user
    out = subprocess.run([python, "-c", PEER_CLIENT, str(path)], user=uid, group=gid, extra_groups=[],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def public_runtime_dir(monkeypatch):
    """A runtime directory another user can traverse (pytest's short_tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="nativereload-test-run-"))
    os.chmod(path, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
def test_another_user_is_refused(other_user, public_runtime_dir, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    child = ServingChild(moddir, public_runtime_dir)
    try:
        _check_refused(other_user, child)
    finally:
        child.stop()


def _check_refused(other_user, child: ServingChild) -> None:
    # The file system refuses first: 0700 directory, 0600 socket.
    assert as_other(other_user, child.socket)["connect"] == "PermissionError"
    # Even with the file permissions opened up, SO_PEERCRED refuses the peer.
    os.chmod(child.socket.parent, 0o755)
    os.chmod(child.socket, 0o666)
    result = as_other(other_user, child.socket)
    assert result["connect"] == "ok"
    assert result["reply"]["ok"] is False and result["reply"]["error"]["type"] == "PermissionError"
    assert "modules" not in result["reply"]
    # And the server still serves its own user.
    assert control.request(child.socket, "status")["ok"]
    assert child.alive()
