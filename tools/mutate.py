"""Mutation testing, one module at a time: which small changes to the code does the test suite not notice?

    python tools/mutate.py elfcheck                  # every mutant of nativereload/elfcheck.py
    python tools/mutate.py registry --jobs 2         # two mutants at a time (one repository copy each)
    python tools/mutate.py gate --only 17 -v         # one mutant, its diff and the test output
    python tools/mutate.py workdir --list            # list the mutants, run nothing
    python tools/mutate.py elfcheck --rerun out.json # only the survivors of an earlier run (--json out.json)
    python tools/mutate.py gate --rerun out.json --suite-coverage   # ... each meeting every test that runs its line
    python tools/mutate.py elfcheck --sample 250     # a random 250 of its mutants (seed 13): an estimate

Each mutant is one change to the module's syntax tree (mutmut 3.8 could not
be used: the tests start child interpreters, which its trampolines do not
reach):

    comparisons     == <-> !=, < <-> <=, > <-> >=, in <-> not in, is <-> is not
    boolean         and <-> or, `not x` -> `x`
    arithmetic      + <-> -, * -> +, // -> *, % -> //, & <-> |, ^ -> &, << <-> >>, += <-> -=
    constants       n -> n + 1 (integers), True <-> False
    statements      raise -> pass, `return x` -> `return None`, a call statement -> pass,
                    continue <-> break

It runs in a copy of the repository (so the working tree is never touched), with
the sample libraries built once and shared (``NATIVERELOAD_SAMPLES_CACHE``). For
each mutant: first the tests that run its line (coverage.py, measured once on
the unmutated module over the module's test files, or over the whole suite with
``--suite-coverage``; ``pip install pytest-cov``), then, if it survives those,
the rest of the module's own test files; each with ``-x`` (the first failure
kills it), the tests that reach fewest lines first. A line reached only in child
processes has no covering test and goes straight to the module's files.
``--no-select`` skips the first step. With ``--full``, each survivor then runs
the whole suite.

A mutant whose test hangs past PER_TEST_TIMEOUT, or whose run outlasts twice
the unmutated list's measured time (never less than ``--timeout``), counts as
killed (it hung), and is printed as such; one that does not compile is left
out. Survivors judged equivalent (no behaviour changes) are listed, each with
its reason, in ``tools/mutate-equivalent.txt`` beside this script, keyed by
module, operator and the source text it changes; they are reported, not
counted.

Score = killed / (mutants - equivalent). With ``--sample N``, a seeded random
sample of the mutants is tested, and the summary gives the score's 95 %
confidence interval (Wilson) over the whole module. Prints one line per mutant
that survives or times out, and a summary line; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = Path(__file__).resolve().parent / "mutate-equivalent.txt"

# Mutants inside an os.kill(...) call (signal 0 -> 1: SIGHUP to whatever pid the test asks about) run only
# with these tests, which replace os.kill: never with the whole suite, whose processes are real.
SIGNAL_SAFE_TESTS = {"workdir": ["tests/test_workdir.py::test_pid_alive"]}

# Seconds one test may run in a mutation run (the suite's own limit is 300; its slowest test takes about 20).
PER_TEST_TIMEOUT = 60

# The test files that exercise each module (the first run); survivors get the whole suite.
TESTS = {
    "elf": ["tests/test_elf.py", "tests/test_elf_readers.py", "tests/test_interface.py", "tests/test_embed.py"],
    "elfcheck": ["tests/test_elf.py", "tests/test_crash_safety.py"],
    "workdir": ["tests/test_workdir.py", "tests/test_tmpdir.py", "tests/test_tmpcleaner.py", "tests/test_registry.py"],
    "image": ["tests/test_image.py", "tests/test_module_files.py", "tests/test_trust.py", "tests/test_reload.py",
              "tests/test_registry.py", "tests/test_tmpdir.py", "tests/test_crash_safety.py",
              "tests/test_tmpcleaner.py", "tests/test_lifecycle.py", "tests/test_contracts.py",
              "tests/test_interface.py", "tests/test_embed.py", "tests/test_objects.py"],
    "gate": ["tests/test_objects.py", "tests/test_lifecycle.py", "tests/test_gate.py", "tests/test_registry.py",
             "tests/test_stress.py"],
    "registry": ["tests/test_registry.py", "tests/test_reload.py", "tests/test_tmpcleaner.py", "tests/test_trust.py",
                 "tests/test_module_files.py", "tests/test_image.py", "tests/test_workdir.py",
                 "tests/test_stress.py", "tests/test_tmpdir.py", "tests/test_lifecycle.py", "tests/test_objects.py",
                 "tests/test_contracts.py", "tests/test_interface.py", "tests/test_compiled.py"],
    "trust": ["tests/test_trust.py"],
    "status": ["tests/test_registry.py", "tests/test_objects.py", "tests/test_tmpcleaner.py", "tests/test_lifecycle.py"],
    "contract": ["tests/test_contracts.py", "tests/test_lifecycle.py"],
}

_COMPARE_SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
                  ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult,
                ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd,
                ast.LShift: ast.RShift, ast.RShift: ast.LShift}
_SYMBOLS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-",
            ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
            ast.LShift: "<<", ast.RShift: ">>", ast.And: "and", ast.Or: "or"}


class Mutant:
    def __init__(self, number: int, line: int, operator: str, text: str, end_line: int) -> None:
        self.number, self.line, self.operator, self.text = number, line, operator, text
        self.lines = range(line, end_line + 1)   # the source lines the mutated node spans
        self.key = ""            # "module | operator | text[ #n]", unique within the module
        self.outcome = ""        # killed, survived, timeout, equivalent, invalid
        self.detail = ""
        self.signals = False     # inside os.kill(...): run only with SIGNAL_SAFE_TESTS

    def describe(self) -> str:
        return f"#{self.number} line {self.line}: {self.operator} in `{self.text}`"


def _skip_nodes(tree: ast.Module) -> set[int]:
    """Nodes never mutated: docstrings, annotations, __all__."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(child) for child in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                mark(first)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for arg in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                        node.args.vararg, node.args.kwarg):
                if arg is not None:
                    mark(arg.annotation)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            mark(node)
    return skip


def _signal_nodes(tree: ast.Module) -> set[int]:
    """Nodes inside an ``os.kill(...)`` call: a mutant there could signal another process for real."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) == "kill":
            inside.update(id(child) for child in ast.walk(node))
    return inside


def _points(tree: ast.Module) -> list[tuple[ast.AST, str, object]]:
    """Every mutation point: (node, operator description, how)."""
    skip = _skip_nodes(tree)
    points = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for index, op in enumerate(node.ops):
                if type(op) in _COMPARE_SWAPS:
                    new = _COMPARE_SWAPS[type(op)]
                    points.append((node, f"{_SYMBOLS[type(op)]} -> {_SYMBOLS[new]}", ("compare", index, new)))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            points.append((node, f"{_SYMBOLS[type(node.op)]} -> {_SYMBOLS[new]}", ("boolop", new)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((node, "not x -> x", ("not",)))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
            new = _BINOP_SWAPS[type(node.op)]
            points.append((node, f"{_SYMBOLS[type(node.op)]} -> {_SYMBOLS[new]}", ("binop", new)))
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            new = ast.Sub if isinstance(node.op, ast.Add) else ast.Add
            points.append((node, f"{_SYMBOLS[type(node.op)]}= -> {_SYMBOLS[new]}=", ("augassign", new)))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            points.append((node, f"{node.value} -> {not node.value}", ("const", not node.value)))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            points.append((node, f"{node.value} -> {node.value + 1}", ("const", node.value + 1)))
        elif isinstance(node, ast.Raise):
            points.append((node, "raise -> pass", ("pass",)))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            points.append((node, "return x -> return None", ("return-none",)))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            points.append((node, "call -> pass", ("pass",)))
        elif isinstance(node, ast.Continue):
            points.append((node, "continue -> break", ("break",)))
        elif isinstance(node, ast.Break):
            points.append((node, "break -> continue", ("continue",)))
    points.sort(key=lambda point: (point[0].lineno, point[0].col_offset, point[1]))
    return points


def _apply(tree: ast.Module, target: ast.AST, how: tuple) -> ast.Module:
    """A copy of ``tree`` with ``target`` (a node of ``tree``) changed as ``how`` says."""
    originals = list(ast.walk(tree))
    mutated = copy.deepcopy(tree)
    node = list(ast.walk(mutated))[originals.index(target)]
    kind = how[0]
    if kind == "compare":
        node.ops[how[1]] = how[2]()
    elif kind in ("boolop", "binop", "augassign"):
        node.op = how[1]()
    elif kind == "const":
        node.value = how[1]
    elif kind in ("not", "pass", "return-none", "break", "continue"):
        replacement = {"not": lambda: node.operand, "pass": ast.Pass,
                       "return-none": lambda: ast.Return(value=ast.Constant(value=None)),
                       "break": ast.Break, "continue": ast.Continue}[kind]()
        ast.copy_location(replacement, node)
        _replace(mutated, node, replacement)
    return ast.fix_missing_locations(mutated)


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(item is old for item in value):
                value[[id(item) for item in value].index(id(old))] = new
                return
    raise AssertionError("node not found")


def mutants(source: str, module: str) -> tuple[ast.Module, list[tuple[Mutant, ast.AST, tuple]]]:
    """Every mutant of ``source``. A mutant's key names it by the source line it changes (not by its line
    number, which moves whenever code above it does): "module | operator | `text` in: line"."""
    tree = ast.parse(source)
    signalling = _signal_nodes(tree)
    lines = source.splitlines()
    result = []
    seen: dict[str, int] = {}
    for number, (node, operator, how) in enumerate(_points(tree), 1):
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        text = " ".join(text.split())
        if len(text) > 90:
            text = text[:87] + "..."
        mutant = Mutant(number, node.lineno, operator, text, node.end_lineno or node.lineno)
        line = " ".join(lines[node.lineno - 1].split())
        key = f"{module} | {operator} | `{text}` in: {line}"
        seen[key] = seen.get(key, 0) + 1
        mutant.key = key if seen[key] == 1 else f"{key} #{seen[key]}"
        mutant.signals = id(node) in signalling
        result.append((mutant, node, how))
    return tree, result


def _wilson(hits: int, trials: int, z: float = 1.96) -> str:
    """The Wilson score interval of a proportion, as "a-b %"."""
    if not trials:
        return "undefined (no mutants)"
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return f"{100 * max(0.0, centre - half):.1f}-{100 * min(1.0, centre + half):.1f} %"


def load_equivalent() -> dict[str, str]:
    """key -> reason, from tools/mutate-equivalent.txt ("key  ## reason" lines; # comments)."""
    entries = {}
    if EQUIVALENT_FILE.exists():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            key, _, reason = line.partition("  ## ")
            entries[key.strip()] = reason.strip()
    return entries


class Sandbox:
    """A copy of the repository in which one mutant at a time replaces the module."""

    def __init__(self, module: str, samples_cache: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"nrmut-{module}-"))
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, tracked.decode().split("\0")):
            source = ROOT / name
            if source.is_file():
                target = self.dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        for built in (ROOT / "nativereload").glob("_gate*.so"):
            shutil.copy2(built, self.dir / "nativereload" / built.name)
        for name in ("elf.py", "elfcheck.py", "workdir.py", "image.py", "gate.py", "registry.py", "trust.py",
                     "status.py", "contract.py"):
            if (ROOT / "nativereload" / name).exists():     # the working tree's, committed or not
                shutil.copy2(ROOT / "nativereload" / name, self.dir / "nativereload" / name)
        self.target = self.dir / "nativereload" / f"{module}.py"
        self.original = self.target.read_text()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(self.dir) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["NATIVERELOAD_SAMPLES_CACHE"] = str(samples_cache)
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"

    def covering_tests(self, tests: list[str], timeout: float) -> dict[int, list[str]]:
        """line of the module -> the test ids that run it, from one coverage run of ``tests`` on the unmutated
        module (in-process only: a line run only by a child interpreter has no entry). Sets ``baseline``."""
        data_file = self.dir / ".coverage-select"
        env = dict(self.env, COVERAGE_FILE=str(data_file))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--cov={self.target.parent}",
                   "--cov-context=test", "--cov-report=", *tests]
        began = time.monotonic()
        result = subprocess.run(command, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout,
                                start_new_session=True)
        self.baseline = time.monotonic() - began
        output = result.stdout + result.stderr
        if result.returncode not in (0, 1) or not data_file.exists():
            raise SystemExit("the coverage run of the unmutated module failed:\n" + output[-3000:])
        # A test that fails without any mutant (some do under coverage's tracing, e.g. a child that must exit
        # within a deadline) would "kill" every mutant it is selected for: it is never selected.
        failing = {found.group(1) for found in re.finditer(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)}
        if failing:
            print(f"coverage: {len(failing)} tests fail on the unmutated module and are not selected: "
                  + ", ".join(sorted(failing)), flush=True)
        import coverage
        data = coverage.CoverageData(basename=str(data_file))
        data.read()
        measured = next((name for name in data.measured_files() if Path(name) == self.target), None)
        covering: dict[int, list[str]] = {}
        for line, contexts in (data.contexts_by_lineno(measured) if measured else {}).items():
            ids = dict.fromkeys(context.rpartition("|")[0] for context in contexts if "|" in context)
            covering[line] = [test for test in ids if test and test not in failing]
        return covering

    def run(self, source: str, tests: list[str], timeout: float, skip: list[str] = ()) -> tuple[str, str]:
        """("passed" | "failed" | "timeout", output tail) for the tests with ``source`` as the module, leaving out
        the test ids in ``skip``."""
        self.target.write_text(source)
        # A hung test fails after PER_TEST_TIMEOUT (pytest-timeout), not the suite's 300 s: a hang kills the mutant.
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o",
                   f"timeout={PER_TEST_TIMEOUT}", *tests, *(f"--deselect={test}" for test in skip)]
        try:
            result = subprocess.run(command, cwd=self.dir, env=self.env, capture_output=True, text=True,
                                    timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            return "timeout", (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""
        finally:
            self.target.write_text(self.original)
        tail = (result.stdout + result.stderr)[-3000:]
        if result.returncode == 0:
            return "passed", tail
        if result.returncode == 5:          # no tests collected: a broken test selection, not a kill
            raise SystemExit(f"no tests ran: {' '.join(tests)}")
        return "failed", tail

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a module of nativereload: " + ", ".join(TESTS))
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (one repository copy each)")
    parser.add_argument("--only", type=int, action="append", help="test only mutant N (repeatable)")
    parser.add_argument("--rerun", type=Path, help="test only the survivors recorded in this --json file (by key)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--sample", type=int, help="test only a random N of the mutants (an estimate of the score)")
    parser.add_argument("--seed", type=int, default=13, help="the --sample's random seed")
    parser.add_argument("--full", action="store_true", help="rerun each survivor on the whole suite")
    parser.add_argument("--timeout", type=float, default=150,
                        help="seconds per test run before it counts as a hang, at least (a run may take twice as "
                             "long as the unmutated test list took)")
    parser.add_argument("--json", type=Path, help="write every mutant's outcome here")
    parser.add_argument("--no-select", action="store_true",
                        help="run the module's test files for every mutant, without first running the tests "
                             "coverage says reach its line")
    parser.add_argument("--suite-coverage", action="store_true",
                        help="measure which tests reach each line over the whole suite, not only the module's test "
                             "files (slower once; use it with --rerun, so a survivor meets every test that runs it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every mutant, and survivors' output")
    args = parser.parse_args(argv)

    module = args.module.removesuffix(".py")
    path = ROOT / "nativereload" / f"{module}.py"
    if not path.exists():
        parser.error(f"no module {path}")
    source = path.read_text()
    tree, all_mutants = mutants(source, module)
    every_key = {mutant.key for mutant, _node, _how in all_mutants}
    if args.only:
        all_mutants = [item for item in all_mutants if item[0].number in args.only]
    if args.rerun:
        keys = {entry["key"] for entry in json.loads(args.rerun.read_text()) if entry["outcome"] == "survived"}
        all_mutants = [item for item in all_mutants if item[0].key in keys]
    population = len(all_mutants)
    if args.sample and args.sample < population:
        all_mutants = sorted(random.Random(args.seed).sample(all_mutants, args.sample), key=lambda item: item[0].number)
    if args.list:
        for mutant, _node, _how in all_mutants:
            print(f"{mutant.describe()}    [{mutant.key}]")
        print(f"{len(all_mutants)} mutants")
        return 0
    tests = [test for test in TESTS.get(module, []) if (ROOT / test).exists()] or ["tests"]
    equivalent = load_equivalent()
    started = time.monotonic()
    samples_cache = Path(tempfile.mkdtemp(prefix="nrmut-samples-"))
    sandboxes: list[Sandbox] = []
    free: list[Sandbox] = []
    lock = threading.Lock()
    printed = threading.Lock()
    done = [0]

    def take() -> Sandbox:
        with lock:
            if free:
                return free.pop()
            sandbox = Sandbox(module, samples_cache)
            sandboxes.append(sandbox)
            return sandbox

    def test(item: tuple[Mutant, ast.AST, tuple]) -> Mutant:
        mutant, node, how = item
        try:
            mutated = ast.unparse(_apply(tree, node, how))
            compile(mutated, str(path), "exec")
        except (SyntaxError, ValueError, AssertionError) as exc:
            mutant.outcome, mutant.detail = "invalid", str(exc)
            return mutant
        if mutant.signals and module not in SIGNAL_SAFE_TESTS:
            mutant.outcome, mutant.detail = "invalid", "inside os.kill(): not run (no signal-safe tests listed)"
            return mutant
        sandbox = take()
        try:
            # The tests that reach fewest lines first: a test written for this line fails (-x) before the broad ones.
            selected = sorted(dict.fromkeys(test for line in mutant.lines for test in covering.get(line, ())),
                              key=lambda test: reach.get(test, 0))
            outcome = "passed"
            if selected and not mutant.signals:
                outcome, tail = sandbox.run(mutated, selected, deadline[0])
            if outcome == "passed":     # the rest of the module's tests (the selected ones just passed)
                outcome, tail = sandbox.run(mutated, SIGNAL_SAFE_TESTS[module] if mutant.signals else tests,
                                            deadline[0], skip=[] if mutant.signals else selected)
            if outcome == "passed" and args.full and not mutant.signals:
                outcome, tail = sandbox.run(mutated, ["tests"], max(args.timeout * 3, deadline[0] * 2))
        finally:
            with lock:
                free.append(sandbox)
        mutant.outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[outcome]
        if mutant.outcome == "survived" and mutant.key in equivalent:
            mutant.outcome, mutant.detail = "equivalent", equivalent[mutant.key]
        elif mutant.outcome == "survived":
            mutant.detail = tail
        with printed:
            done[0] += 1
            if done[0] % 50 == 0:
                print(f"... {done[0]}/{len(all_mutants)} mutants tested", flush=True)
            if args.verbose or mutant.outcome in ("survived", "timeout"):
                print(f"{mutant.outcome.upper():10} {mutant.describe()}    [{mutant.key}]", flush=True)
                if args.verbose and mutant.outcome == "survived":
                    print(tail[-1500:], flush=True)
        return mutant

    covering: dict[int, list[str]] = {}
    reach: dict[str, int] = {}          # test id -> how many of the module's lines it runs
    # A run's deadline: twice what the unmutated module's test list took here (the coverage run, which tracing
    # slows, or a plain run), never less than --timeout. A fixed deadline turned a survivor whose tests merely
    # ran long on a loaded machine into a "timeout" kill.
    deadline = [args.timeout]
    try:
        if args.no_select:
            sandbox = take()
            began = time.monotonic()
            outcome, tail = sandbox.run(sandbox.original, tests, args.timeout * 6)
            free.append(sandbox)
            if outcome != "passed":
                raise SystemExit(f"the unmutated module's tests do not pass ({outcome}):\n{tail}")
            deadline[0] = max(args.timeout, 2 * (time.monotonic() - began))
            print(f"the unmutated module's tests pass in {time.monotonic() - began:.0f} s; a run's deadline is "
                  f"{deadline[0]:.0f} s", flush=True)
        else:
            try:
                import coverage  # noqa: F401  (pytest-cov brings it)
            except ImportError:
                parser.error("test selection needs pytest-cov (pip install pytest-cov), or pass --no-select")
            sandbox = Sandbox(module, samples_cache)
            sandboxes.append(sandbox)
            free.append(sandbox)
            covering = sandbox.covering_tests(["tests"] if args.suite_coverage else tests, args.timeout * 6)
            deadline[0] = max(args.timeout, 2 * sandbox.baseline)
            for tests_of_line in covering.values():
                for test_id in tests_of_line:
                    reach[test_id] = reach.get(test_id, 0) + 1
            print(f"coverage: {len(covering)} lines of {module}.py run in-process by "
                  f"{'the suite' if args.suite_coverage else 'the listed tests'} in {sandbox.baseline:.0f} s; "
                  f"a run's deadline is {deadline[0]:.0f} s", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(test, all_mutants))
    finally:
        for sandbox in sandboxes:
            sandbox.remove()
        shutil.rmtree(samples_cache, ignore_errors=True)

    counts = {outcome: sum(1 for m in results if m.outcome == outcome)
              for outcome in ("killed", "timeout", "survived", "equivalent", "invalid")}
    valid = len(results) - counts["invalid"] - counts["equivalent"]
    killed = counts["killed"] + counts["timeout"]
    score = 100.0 * killed / valid if valid else 100.0
    stale = [key for key in equivalent if key.startswith(f"{module} | ") and key not in every_key]
    print(f"mutate {module}.py: {len(results)} mutants, {killed} killed ({counts['timeout']} by timeout), "
          f"{counts['survived']} survived, {counts['equivalent']} equivalent (listed), {counts['invalid']} invalid: "
          f"score {score:.1f} % in {time.monotonic() - started:.0f} s"
          + (f"; {len(stale)} stale entries in {EQUIVALENT_FILE.name}" if stale else "")
          + (f"; a sample of {len(results)} of {population} mutants (seed {args.seed}): 95 % confidence interval "
             f"{_wilson(killed, valid)}" if len(results) < population and not (args.only or args.rerun) else ""))
    if args.json:
        args.json.write_text(json.dumps([{"number": m.number, "line": m.line, "operator": m.operator,
                                          "text": m.text, "key": m.key, "outcome": m.outcome,
                                          "detail": m.detail[-800:]} for m in results], indent=1))
    return 0 if counts["survived"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
