"""Objects of real C libraries across reloads: SQLite, zstd, zlib and lz4 as Debian ships them.

Each scenario (tests/real_libraries.py) runs in a child process on each gate,
so a crash fails the test with its signal instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, private_copies

HERE = Path(__file__).resolve().parent
LIBDIR = Path("/usr/lib/x86_64-linux-gnu") if Path("/usr/lib/x86_64-linux-gnu").is_dir() else Path("/usr/lib")


def needs(*names: str) -> None:
    missing = [name for name in names if not (LIBDIR / name).exists()]
    if missing:
        pytest.skip(f"system library not installed: {', '.join(missing)}")


def run_scenario(name: str, tmp_path: Path, gate_impl: str, timeout: float = 240) -> dict:
    copies = tmp_path / "copies"
    copies.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NATIVERELOAD_PURE_PYTHON", None)
    if gate_impl == "python":
        env["NATIVERELOAD_PURE_PYTHON"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "real_libraries.py"), name, str(copies)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode < 0:
        pytest.fail(f"scenario {name} died with {signal.Signals(-proc.returncode).name}:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert private_copies(copies) == [], "the registry left copies behind"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_sqlite_threads_loop_while_reloading(tmp_path, gate_impl):
    needs("libsqlite3.so.0")
    result = run_scenario("sqlite_threads", tmp_path, gate_impl)
    assert result["errors"] == []
    assert result["generation"] == 201
    assert all(loops >= 3 for loops in result["loops"]), result["loops"]
    assert result["drained"] and result["images_left"] == 1


@pytest.mark.timeout(120)
def test_sqlite_connection_lives_across_reloads(tmp_path, gate_impl):
    needs("libsqlite3.so.0")
    result = run_scenario("sqlite_connection_across_reloads", tmp_path, gate_impl)
    assert result["answer"] == 42
    assert result["held"][0] == [1, "retired", {"sqlite3 *": 1}]
    assert [generation for generation, _, _ in result["held"]] == [1, 51]     # 2..50 drained at once
    assert result["mapped_before_close"] and not result["mapped_after_close"]
    assert result["drained"]


@pytest.mark.timeout(120)
def test_zstd_contexts_stream_across_reloads(tmp_path, gate_impl):
    needs("libzstd.so.1")
    result = run_scenario("zstd_contexts", tmp_path, gate_impl)
    assert result["round_trip"] and result["reference"]
    assert result["held"][0] == [1, "retired", {"ZSTD_CCtx *": 1, "ZSTD_DCtx *": 1}]
    assert result["drained"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["handles", "pin"])
def test_zlib_stream_across_reloads(tmp_path, gate_impl, how):
    needs("libz.so.1")
    result = run_scenario(f"zlib_stream_{how}", tmp_path, gate_impl)
    assert result["round_trip"] and result["reloads"] >= 8 and result["drained"]


@pytest.mark.timeout(300)
def test_static_strings_survive_concurrent_reloads(tmp_path, gate_impl):
    needs("libzstd.so.1")
    result = run_scenario("static_strings", tmp_path, gate_impl)
    assert result["errors"] == [] and all(result["calls"]) and result["drained"]
    assert result["expected"] == "Error (generic)"


@pytest.mark.timeout(120)
def test_a_copy_is_not_found_by_its_soname(tmp_path, gate_impl):
    needs("liblz4.so.1")
    result = run_scenario("soname", tmp_path, gate_impl)
    assert result["owner"] is not None and result["owner"] != result["copy"]
    assert Path(result["owner"]).resolve() == (LIBDIR / "liblz4.so.1").resolve()
    assert not result["copy_mapped_after_unload"] and result["drained"]
    assert result["states"] == [] and result["warnings"] == []
