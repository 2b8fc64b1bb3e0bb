"""Mutate a real shared library and load every mutant, each in a child process that may crash.

    python tools/fuzz_elf.py                          # the full run: 10,000 mutants, seed 1
    python tools/fuzz_elf.py --count 400 --seed 7     # a short slice (CI runs one)
    python tools/fuzz_elf.py --no-check               # what glibc does with them when nothing checks first
    python tools/fuzz_elf.py --library x.so --cdef "int f(void);" --call f

The library (by default ``csrc/samples/sample.c``, built with the project's
CMake helper into a temporary directory) is parsed once through its section
headers, which name the regions to mutate:

    elf-header, program-headers, dynamic, hash,      guarded: the ELF check must refuse every mutant
    strings, versions, notes, init-arrays,            that would crash (issue 13)
    truncated, truncated-no-sections
    symbols, relocations                              partly guarded: a symbol retyped as an IFUNC, or a
                                                      relocation retyped to another valid type, is the
                                                      library's own code misbehaving
    code                                              machine code: only the crash canary can catch it

Each mutant changes one to three fields of one region to a value chosen to
break an assumption (0, 1, all ones, 0x7fffffff, the value ± a page, a bit
flipped, another entry's value, entries swapped or dropped). Mutants come from
``random.Random(seed)``: the same seed gives the same mutants. A worker
interpreter loads each through a Registry (``load`` -> call the declared
functions -> ``unload`` -> ``wait_drained``) and reports the outcome; a
worker that dies is restarted, and its mutant counted as a crash in the
phase it was in. A mutant still running after ``--timeout`` seconds is a hang.

A worker that ran mutated machine code is replaced before the next mutant.
Prints one summary line (and, with ``-v``, a line per crash); exits 1 if any
mutant of a guarded region crashed or hung, 0 otherwise. ``--keep DIR`` saves
the mutants that crashed. About 60 s per 10,000 mutants on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_CDEF = """
int version(void);
const char *version_string(void);
long add(long, long);
long scaled(long);
long counter_next(void);
double dot4(double, double, double, double);
"""
SAMPLE_CALLS = ["version", "add", "scaled", "counter_next", "dot4", "version_string"]

GUARDED = ("elf-header", "program-headers", "dynamic", "hash", "strings", "versions", "notes", "init-arrays",
           "truncated", "truncated-no-sections")
PARTLY = ("symbols", "relocations")
UNGUARDED = ("code",)
CATEGORIES = GUARDED + PARTLY + UNGUARDED

# The child: reads mutant paths on stdin, answers one line each on stdout, and
# says which phase it is in before each (so a crash is placed in its phase).
WORKER = r"""
import json, os, sys
import nativereload
from nativereload import elfcheck
spec = json.loads(sys.argv[1])
if spec["no_check"]:
    elfcheck.check_fd = lambda fd: None
ARGS = {"add": (2, 3), "scaled": (3,), "dot4": (1.0, 2.0, 3.0, 4.0)}
out = sys.stdout
reg = nativereload.Registry(tmpdir=spec["tmpdir"])
for line in sys.stdin:
    path = line.rstrip("\n")
    out.write("phase load\n"); out.flush()
    try:
        mod = reg.load("mutant", cdef=spec["cdef"], file=path)
    except nativereload.NativeReloadError as exc:
        out.write("result refused " + type(exc).__name__ + "\n"); out.flush()
        continue
    out.write("phase call\n"); out.flush()
    for name in spec["calls"]:
        try:
            value = getattr(mod, name)(*ARGS.get(name, ()))
            if name == "version_string":
                mod.ffi.string(value)
        except Exception:
            pass
    value = None     # a pointer result holds its image open (issue 7): drop it, or the drain waits for it
    out.write("phase close\n"); out.flush()
    reg.unload("mutant")
    reg.wait_drained(10)
    out.write("result loaded\n"); out.flush()
"""


class Library:
    """The original file and the byte ranges of its regions (from its section headers)."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        data = self.data
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise SystemExit(f"{path}: only 64-bit little-endian ELF files are supported")
        (self.phoff, self.shoff) = struct.unpack_from("<QQ", data, 32)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 54)
        self.regions: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)   # (start, end, entry)
        self.regions["elf-header"].append((0, 64, 0))
        self.regions["program-headers"].append((self.phoff, self.phoff + phnum * phentsize, phentsize))
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, self.shoff + i * shentsize) for i in range(shnum)]
        names_at = sections[shstrndx][4]

        def name(sh_name: int) -> str:
            end = data.index(b"\0", names_at + sh_name)
            return data[names_at + sh_name:end].decode()

        kinds = {".dynamic": "dynamic", ".gnu.hash": "hash", ".hash": "hash", ".dynsym": "symbols",
                 ".dynstr": "strings", ".gnu.version": "versions", ".gnu.version_r": "versions",
                 ".gnu.version_d": "versions", ".rela.dyn": "relocations", ".rela.plt": "relocations",
                 ".init_array": "init-arrays", ".fini_array": "init-arrays", ".text": "code", ".init": "code",
                 ".fini": "code", ".plt": "code"}
        for sh_name, sh_type, _flags, _addr, offset, size, _link, _info, _align, entsize in sections:
            section = name(sh_name)
            kind = kinds.get(section) or ("notes" if section.startswith(".note") else None)
            if kind and size and sh_type != 8:          # SHT_NOBITS has no bytes in the file
                self.regions[kind].append((offset, offset + size, entsize))
        self.alloc_end = max(offset + size for _n, sh_type, flags, _a, offset, size, *_rest in sections
                             if flags & 2 and sh_type != 8)
        missing = [kind for kind in CATEGORIES if kind not in self.regions and not kind.startswith("truncated")]
        if missing:
            print(f"note: {path.name} has no {', '.join(missing)}: those categories are skipped", file=sys.stderr)


def interesting(old: int, width: int, rng: random.Random, others: list[int]) -> int:
    """A value for a field of ``width`` bytes that used to hold ``old``."""
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old ^ (1 << rng.randrange(8 * width)),
               old + 4096, old - 4096, old * 2, old + 8, old - 8, rng.randrange(top + 1), rng.randrange(64),
               0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, old + 0x10000]
    if others:
        choices.append(rng.choice(others))
    return rng.choice(choices) & top


def mutate(lib: Library, category: str, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of ``category``, and a short description of what changed."""
    data = bytearray(lib.data)
    if category == "truncated":
        size = rng.randrange(len(data))
        return bytes(data[:size]), f"cut at {size}"
    if category == "truncated-no-sections":
        struct.pack_into("<Q", data, 40, 0)              # e_shoff
        struct.pack_into("<HHH", data, 58, 0, 0, 0)      # e_shentsize, e_shnum, e_shstrndx
        size = rng.randrange(lib.alloc_end)
        return bytes(data[:size]), f"no section headers, cut at {size}"
    changes = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        start, end, entsize = rng.choice(lib.regions[category])
        operation = rng.random()
        if entsize >= 8 and end - start >= 2 * entsize and operation < 0.12:
            # Structural: swap two entries, or drop one (the rest move up).
            count = (end - start) // entsize
            a, b = rng.sample(range(count), 2)
            pa, pb = start + a * entsize, start + b * entsize
            if operation < 0.06:
                data[pa:pa + entsize], data[pb:pb + entsize] = data[pb:pb + entsize], data[pa:pa + entsize]
                changes.append(f"swap entries {a},{b} at {start:#x}")
            else:
                data[pa:end] = data[pa + entsize:end] + bytes(entsize)
                changes.append(f"drop entry {a} at {start:#x}")
            continue
        if operation < 0.2:
            position = rng.randrange(start, end)
            bit = rng.randrange(8)
            data[position] ^= 1 << bit
            changes.append(f"flip bit {bit} at {position:#x}")
            continue
        width = rng.choice((1, 2, 4, 4, 8, 8))
        if end - start < width:
            width = 1
        position = start + rng.randrange((end - start) // width) * width
        old = int.from_bytes(data[position:position + width], "little")
        others = [int.from_bytes(data[p:p + width], "little") for p in range(start, end - width + 1, width)]
        new = interesting(old, width, rng, others)
        data[position:position + width] = new.to_bytes(width, "little")
        changes.append(f"{width}@{position:#x} {old:#x}->{new:#x}")
    return bytes(data), "; ".join(changes)


class Worker:
    """One child interpreter loading mutants until it dies."""

    def __init__(self, spec: dict) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONFAULTHANDLER", "")
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                                        bufsize=1)
        self.pending = b""

    def run(self, path: str, timeout: float) -> tuple[str, str]:
        """(outcome, phase): outcome is "refused", "loaded", "crashed:<how>" or "hung"."""
        try:
            self.process.stdin.write(path + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._died("load")
        phase = "load"
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while True:
            # Our own line buffer over the raw fd: a buffered readline could
            # swallow two lines while select() only sees the fd.
            while b"\n" not in self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    self.kill()
                    return "hung", phase
                chunk = os.read(fd, 4096)
                if not chunk:
                    return self._died(phase)
                self.pending += chunk
            line, _, self.pending = self.pending.partition(b"\n")
            word, _, rest = line.decode(errors="replace").partition(" ")
            if word == "phase":
                phase = rest
            elif word == "result":
                return rest.split(" ", 1)[0], phase

    def _died(self, phase: str) -> tuple[str, str]:
        code = self.process.wait()
        if code < 0:
            how = signal.Signals(-code).name
        else:
            how = f"exit {code}"
        return f"crashed:{how}", phase

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process.poll() is None


def build_sample(directory: Path) -> Path:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(directory), *generator, "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(directory), "--target", "sample"], check=True,
                   stdout=subprocess.DEVNULL)
    return directory / "modules" / "sample.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="mutants to try (default 10,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--library", type=Path, help="the library to mutate (default: the sample, built now)")
    parser.add_argument("--cdef", help="its declarations (default: the sample's)")
    parser.add_argument("--call", action="append", help="a function to call after loading (repeatable)")
    parser.add_argument("--categories", help="comma-separated subset of: " + ", ".join(CATEGORIES))
    parser.add_argument("--no-check", action="store_true", help="skip nativereload's ELF check in the worker")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a mutant counts as hung")
    parser.add_argument("--keep", type=Path, help="save the mutants that crashed or hung here")
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--only", type=int, action="append", help="run only mutant N (repeatable: reproduce)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each crash")
    args = parser.parse_args(argv)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="nativereload-fuzz-"))
    try:
        if args.library is None:
            library_path = build_sample(work / "build")
            cdef, calls = SAMPLE_CDEF, SAMPLE_CALLS
        else:
            library_path = args.library
            cdef, calls = args.cdef, args.call or []
            if not cdef:
                parser.error("--library needs --cdef")
        lib = Library(library_path)
        categories = [c for c in (args.categories.split(",") if args.categories else CATEGORIES)
                      if c in lib.regions or c.startswith("truncated")]
        (work / "copies").mkdir()
        spec = {"cdef": cdef, "calls": calls, "no_check": args.no_check, "tmpdir": str(work / "copies")}
        rng = random.Random(args.seed)
        counts: dict[str, collections.Counter] = {c: collections.Counter() for c in categories}
        crashes = []
        worker = Worker(spec)
        mutant_path = work / "mutant.so"
        for number in range(args.count):
            category = categories[number % len(categories)]
            data, change = mutate(lib, category, rng)
            if args.only and number not in args.only:
                continue
            partial = work / "mutant.so.partial"
            partial.write_bytes(data)
            os.replace(partial, mutant_path)
            if not worker.alive():
                worker = Worker(spec)
            outcome, phase = worker.run(str(mutant_path), args.timeout)
            if outcome.startswith("crashed") or outcome == "hung":
                counts[category][outcome if outcome == "hung" else "crashed"] += 1
                crashes.append((number, category, phase, outcome, change))
                if args.verbose:
                    print(f"mutant {number} ({category}): {outcome} during {phase}: {change}", file=sys.stderr)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    (args.keep / f"mutant-{number}-{category}.so").write_bytes(data)
                worker.kill()
            else:
                counts[category][outcome] += 1
                if outcome == "loaded" and category in UNGUARDED:
                    worker.kill()         # mutated code ran: it may have corrupted the worker for the next one
        worker.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    total = collections.Counter()
    for counter in counts.values():
        total.update(counter)
    guarded_failures = sum(counts[c]["crashed"] + counts[c]["hung"] for c in counts if c in GUARDED)
    phases = collections.Counter(phase for _n, _c, phase, _o, _ch in crashes)
    per_category = ", ".join(f"{c} {counts[c]['refused']}/{counts[c]['loaded']}/{counts[c]['crashed']}"
                             + (f"+{counts[c]['hung']} hung" if counts[c]["hung"] else "") for c in categories)
    print(f"fuzz_elf: seed {args.seed}, {args.count} mutants of {library_path.name}"
          f"{' (no check)' if args.no_check else ''} in {elapsed:.0f} s: refused {total['refused']}, "
          f"loaded {total['loaded']}, crashed {total['crashed']} "
          f"(load {phases['load']}, call {phases['call']}, close {phases['close']}), hung {total['hung']}; "
          f"per category refused/loaded/crashed: {per_category}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "count": args.count, "no_check": args.no_check,
                                         "seconds": round(elapsed, 1),
                                         "categories": {c: dict(counts[c]) for c in categories},
                                         "crashes": [dict(zip(("number", "category", "phase", "outcome",
                                                               "change"), crash)) for crash in crashes]},
                                        indent=1))
    return 1 if guarded_failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
