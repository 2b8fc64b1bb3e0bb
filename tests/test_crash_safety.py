"""Scenarios that crash a process that gets them wrong: each runs in a child interpreter.

A crash (SIGBUS/SIGSEGV) shows as a negative return code and fails the test
instead of killing pytest.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import SAMPLE_CDEF, install, run_python

PRELUDE = f"""
import json, os, shutil, sys, threading
import nativereload
CDEF = {SAMPLE_CDEF!r}
"""


def child_env():
    return {"NATIVERELOAD_PURE_PYTHON": os.environ.get("NATIVERELOAD_PURE_PYTHON", "")}


@pytest.mark.timeout(120)
def test_truncated_files_never_reach_dlopen(moddir, samples, tmpdir_for_copies, gate_impl):
    # Every cut of a real library, loaded and reloaded: a LoadError each time, never a signal.
    install(samples["v1"], moddir / "sample.so")
    code = PRELUDE + f"""
data = open({str(samples["v2"])!r}, "rb").read()
source = {str(moddir / "sample.so")!r}
reg = nativereload.Registry(path=[{str(moddir)!r}], tmpdir={str(tmpdir_for_copies)!r})
mod = reg.load("sample", cdef=CDEF)
refused = 0
for size in range(0, len(data), 97):
    with open(source + ".partial", "wb") as f:
        f.write(data[:size])
    os.replace(source + ".partial", source)
    try:
        reg.reload("sample")
    except nativereload.LoadError:
        refused += 1
    assert mod.version() == 1 and mod.generation == 1
print(json.dumps({{"refused": refused, "tries": len(range(0, len(data), 97))}}))
"""
    result = run_python(code, env=child_env(), timeout=100)
    assert result.returncode == 0, f"child died with {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    assert report["refused"] == report["tries"] > 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replacement", ["v2", "half"])
def test_in_place_overwrite_of_a_loaded_file(moddir, samples, tmpdir_for_copies, gate_impl, replacement):
    # `cp new.so loaded.so` rewrites the same inode while threads call: since
    # only our private copy is mapped, nothing running notices. A complete
    # new build then reloads; a half-written one is refused.
    install(samples["v1"], moddir / "sample.so")
    new = samples["v2"].read_bytes()
    if replacement == "half":
        new = new[: len(new) // 2]
    code = PRELUDE + f"""
reg = nativereload.Registry(path=[{str(moddir)!r}], tmpdir={str(tmpdir_for_copies)!r})
mod = reg.load("sample", cdef=CDEF)
stop = threading.Event()
seen, errors = set(), []
def caller():
    while not stop.is_set():
        try:
            seen.add((mod.version(), mod.scaled(10)))
        except Exception as exc:
            errors.append(repr(exc))
threads = [threading.Thread(target=caller) for _ in range(3)]
for t in threads: t.start()
inode = os.stat({str(moddir / "sample.so")!r}).st_ino
with open({str(moddir / "sample.so")!r}, "r+b") as f:     # in place: same inode, truncated and rewritten
    f.truncate(0)
    f.write({new!r})
assert os.stat({str(moddir / "sample.so")!r}).st_ino == inode
outcome = "reloaded"
try:
    reg.reload("sample")
except nativereload.LoadError as exc:
    outcome = "refused"
threading.Event().wait(0.2)
stop.set()
for t in threads: t.join()
print(json.dumps({{"outcome": outcome, "seen": sorted(seen), "errors": errors[:5], "version": mod.version()}}))
"""
    result = run_python(code, env=child_env(), timeout=100)
    assert result.returncode == 0, f"child died with {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    assert report["errors"] == []
    if replacement == "v2":
        assert report["outcome"] == "reloaded" and report["version"] == 2
        # version() and scaled() are two calls: a reload may fall between them.
        assert set(map(tuple, report["seen"])) <= {(1, 10), (1, 20), (2, 10), (2, 20)}
    else:
        assert report["outcome"] == "refused" and report["version"] == 1
        assert report["seen"] == [[1, 10]]
