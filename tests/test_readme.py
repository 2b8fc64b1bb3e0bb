"""The README's Quickstart works as written: pasted line by line into an empty directory.

Its blocks run in order in a fresh temporary directory: each ``sh`` block through
bash reading it line by line (as a terminal would get a paste), each ``python``
block line by line into one interactive interpreter that lives across the blocks
(the user's session, while they rebuild in another terminal). A line whose
comment starts with a value (``mod.add(2, 3)  # 5: ...``) must print that value.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def blocks(title: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(section(title))]


# Runs in the temporary directory, in a fresh interpreter: the user's terminal and Python session.
DRIVER = textwrap.dedent(r'''
    import code, json, re, subprocess, sys

    blocks = json.load(open(sys.argv[1]))
    console = code.InteractiveConsole()
    shown = []
    sys.displayhook = lambda value: shown.append(value) if value is not None else None
    errors = []
    console.showtraceback = lambda: errors.append(__import__("traceback").format_exc())
    console.showsyntaxerror = lambda filename=None, **kw: errors.append(__import__("traceback").format_exc())
    EXPECTED = re.compile(r"#\s*(-?\d+|True|False)(?::|\s|$)")
    for n, (lang, body) in enumerate(blocks, 1):
        if lang == "sh":
            done = subprocess.run(["bash", "-e"], input=body, text=True, capture_output=True)
            if done.returncode:
                sys.exit(f"block {n} (sh) failed with status {done.returncode}:\n{body}\n{done.stdout}{done.stderr}")
            continue
        more = False
        for line in body.splitlines():
            del shown[:]
            more = console.push(line)
            if errors:
                sys.exit(f"block {n} (python), line {line!r} raised:\n{errors[0]}")
            expected = EXPECTED.search(line.partition("#")[1] + line.partition("#")[2]) if "#" in line else None
            if expected and not more:
                value = eval(expected.group(1))
                if not shown or shown[-1] != value:
                    sys.exit(f"block {n} (python), line {line!r}: printed {shown!r}, the README says {value!r}")
        if more:
            console.push("")
            if errors:
                sys.exit(f"block {n} (python) raised at its end:\n{errors[0]}")
    print("ok")
''')


@pytest.mark.timeout(180)
def test_the_quickstart_works_pasted_into_an_empty_directory(tmp_path):
    found = blocks("Quickstart")
    assert [lang for lang, _ in found] == ["sh", "python", "sh", "python", "sh", "python"]
    assert "interface" in found[0][1] and 'reg.load("counter")' in found[1][1]
    work = tmp_path / "empty"
    work.mkdir()
    # `nativereload` on PATH: this checkout's, whatever is installed.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "nativereload"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nativereload "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "blocks.json").write_text(json.dumps(found))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NATIVERELOAD_PATH", None)
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=160)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert (work / "build" / "modules" / "counter.so").is_file()


def test_the_readme_shows_every_command():
    table = section("Command line and dev loop")
    from nativereload.cli.parser import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert f"| `nativereload {command}" in table, command


OBJECTS_DRIVER = textwrap.dedent(r'''
    import code, json, sys
    console = code.InteractiveConsole()
    shown, errors = [], []
    sys.displayhook = lambda value: shown.append(value) if value is not None else None
    console.showtraceback = lambda: errors.append(__import__("traceback").format_exc())
    for line in json.load(open(sys.argv[1])).splitlines():
        console.push(line)
        if errors:
            sys.exit(f"line {line!r} raised:\n{errors[0]}")
    console.push("")
    print(json.dumps([repr(value) for value in shown]))
''')


@pytest.mark.timeout(120)
def test_the_sqlite_example_of_objects_across_reloads_works(tmp_path):
    if not Path("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0").exists():
        pytest.skip("the system SQLite of the example is not installed")
    [(lang, body)] = blocks("Objects that cross a reload")
    assert lang == "python"
    (tmp_path / "block.json").write_text(json.dumps(body))
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", OBJECTS_DRIVER, str(tmp_path / "block.json")], env=env,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert "(100, 42)" in shown and repr("0 calls, 1 handle (sqlite3 *)") in shown and "True" in shown


@pytest.mark.timeout(240)
def test_the_cluster_example_works_pasted_into_an_empty_directory(tmp_path):
    pytest.importorskip("distributed")
    import socket

    found = blocks("Cluster: every worker of a Dask cluster")
    assert [lang for lang, _ in found[:4]] == ["sh", "python", "sh", "python"]
    # The example's scheduler port, replaced by a free one (tests may run side by side).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    pasted = [(lang, body.replace("8786", port)) for lang, body in found[:4]]
    assert all(port in body for _, body in pasted[1:3])
    work = tmp_path / "empty"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "nativereload"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nativereload "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "blocks.json").write_text(json.dumps(pasted))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=220)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]
    assert "reloaded 'counter' on 3 workers (rolling)" in result.stdout
