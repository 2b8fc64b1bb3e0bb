"""What the interface check costs a reload (issue 8's target: <= 1.2x a reload without an interface, 100 functions).

    python bench/interface.py [--quick]

For N = 10 and 100 functions ``long fI(long)``, it builds the library twice
with its interface embedded (``nativereload embed``): as is, and with one
function more. Then, round-robin in one loop so that the machine's moods hit
every variant alike, it times:
  - reg.reload(): today's reload of the library, with no interface;
  - bare: copy + dlopen + resolve + dlclose + unlink (bench/bare.py);
  - check, unchanged: read the embedded interface from an open fd (pread of
    the section headers and the section) + diff against the serving one
    (equal digests: no JSON decoded) -- every reload of a rebuilt module
    whose header did not change;
  - check, 1 added: the same, when the new build adds a function (the JSON
    is decoded and compared entry by entry);
  - parse: interface.parse(cdef), cffi's parser plus the description --
    what a reload given a new cdef (rather than an embedded one) costs.
The ratios are (reload + check) / reload. The registry would read the
interface from the private copy's fd, which it opens anyway for the ELF
check: opening is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bare import BareLoader  # noqa: E402
from libs import compile_shared, funcs_cdef  # noqa: E402

from nativereload import Registry, cdefgen, interface  # noqa: E402


def build(directory: Path, n: int, extra: int = 0) -> tuple[Path, str]:
    """funcs{n}(+extra).so with its interface embedded; returns (library, cdef)."""
    name = f"funcs{n}" + (f"_plus{extra}" if extra else "")
    header = directory / f"{name}.h"
    header.write_text(funcs_cdef(n + extra))
    source = directory / f"{name}.c"
    source.write_text(f'#include "{header.name}"\n'
                      + "".join(f"long f{i}(long x) {{ return x + {i}; }}\n" for i in range(n + extra)))
    embedded_c = directory / f"{name}_interface.c"
    cdefgen.embed_header(header, embedded_c)
    library = directory / f"{name}.so"
    # compile_shared takes one source: concatenate (the interface file includes the header itself).
    combined = directory / f"{name}_all.c"
    combined.write_text(source.read_text() + embedded_c.read_text())
    compile_shared(combined, library)
    return library, funcs_cdef(n)


def measure(n: int, directory: Path, rounds: int) -> dict[str, float]:
    library, cdef = build(directory, n)
    plus, _ = build(directory, n, extra=1)
    serving = interface.read(library)
    serving.functions   # decoded once, as a serving interface would be
    names = [f"f{i}" for i in range(n)]
    copies = directory / f"copies{n}"
    copies.mkdir()
    bare = BareLoader(cdef, names, str(copies))
    fd_same = os.open(library, os.O_RDONLY)
    fd_plus = os.open(plus, os.O_RDONLY)
    samples: dict[str, list[float]] = {k: [] for k in ("reload", "bare", "check_same", "check_added", "parse",
                                                       "diff_decoded")}
    decoded_plus = interface.read(plus)
    decoded_plus.functions
    with Registry(path=[str(directory)], tmpdir=str(copies)) as reg:
        reg.load(f"funcs{n}", cdef=cdef, file=library)

        def reload() -> None:
            reg.reload(f"funcs{n}")

        def bare_cycle() -> None:
            bare.close(bare.load(str(library)))

        def check_same() -> None:
            assert not interface.diff(serving, interface.read_fd(fd_same, serving=serving))

        def check_added() -> None:
            assert interface.diff(serving, interface.read_fd(fd_plus, serving=serving)).compatible

        def parse() -> None:
            interface.parse(cdef)

        def diff_decoded() -> None:
            interface.diff(serving, decoded_plus)

        work = {"reload": reload, "bare": bare_cycle, "check_same": check_same, "check_added": check_added,
                "parse": parse, "diff_decoded": diff_decoded}
        for fn in work.values():     # warm up
            fn()
        order = list(work)
        for r in range(rounds):
            order = order[1:] + order[:1]
            for key in order:
                if key == "parse" and r % 10:
                    continue         # cffi's parse is slow: one sample in ten rounds is plenty
                started = time.perf_counter_ns()
                work[key]()
                samples[key].append((time.perf_counter_ns() - started) / 1000)
    os.close(fd_same)
    os.close(fd_plus)
    return {k: statistics.median(v) for k, v in samples.items()}


def per_reload(rows, *, directory: Path, tmpdir: str, repeats: int) -> dict[int, float]:
    """Section 7: reg.reload() of a module that embeds its interface (checked on every reload) against the same
    code without one, for 10 and 100 functions, round-robin; returns {N: ratio}."""
    from registries import available_gates, make_registry
    from timing import Stat

    ratios = {}
    gate = available_gates()[0]
    for n in (10, 100):
        embedded, cdef = build(directory, n)
        plain_source = directory / f"plain{n}.c"
        plain_source.write_text("".join(f"long f{i}(long x) {{ return x + {i}; }}\n" for i in range(n)))
        plain = compile_shared(plain_source, directory / f"plain{n}.so")
        with make_registry(gate, str(directory), tmpdir) as reg:
            reg.load("with", file=embedded)
            reg.load("without", cdef=cdef, file=plain)
            samples: dict[str, list[float]] = {"with": [], "without": []}
            for r in range(repeats):
                for name in (("with", "without") if r % 2 else ("without", "with")):
                    started = time.perf_counter_ns()
                    reg.reload(name)
                    samples[name].append((time.perf_counter_ns() - started) / 1000)
        with_, without = Stat.of(samples["with"]), Stat.of(samples["without"])
        ratios[n] = with_.median / without.median
        rows.add("7 interface check", f"{n} functions: reg.reload() without an interface", "us", without,
                 key=f"interface.{n}.without")
        rows.add("7 interface check", f"{n} functions: reg.reload() of a module that embeds it (checked)", "us",
                 with_, ratio=ratios[n], ratio_of="without (same loop)", key=f"interface.{n}.with")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test)")
    args = parser.parse_args(argv)
    rounds = 100 if args.quick else 1000
    print(f"{'N':>4}  {'reg.reload()':>12}  {'bare':>8}  {'check same':>10}  {'check +1':>9}  {'diff +1':>8}  "
          f"{'parse':>9}  {'(reload+same)/reload':>20}  {'(reload+added)/reload':>21}")
    with tempfile.TemporaryDirectory(prefix="nativereload-bench-interface-") as tmp:
        for n in (10, 100):
            d = measure(n, Path(tmp), rounds)
            print(f"{n:>4}  {d['reload']:>9.1f} µs  {d['bare']:>5.1f} µs  {d['check_same']:>7.1f} µs  "
                  f"{d['check_added']:>6.1f} µs  {d['diff_decoded']:>5.1f} µs  {d['parse']:>6.0f} µs  "
                  f"{(d['reload'] + d['check_same']) / d['reload']:>19.3f}x  "
                  f"{(d['reload'] + d['check_added']) / d['reload']:>20.3f}x")
    print("medians; 'check' = read the embedded interface from an open fd + diff against the serving one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
