"""The pytest plugin (nativereload.testing), run with pytester on small user projects."""

from __future__ import annotations

import shutil
import textwrap
from importlib.metadata import entry_points

import pytest

COUNTER = """\
#ifndef VERSION
#define VERSION 1
#endif
#ifndef OFFSET
#define OFFSET 0
#endif
long add(long a, long b) { return a + b + OFFSET; }
int version(void) { return VERSION; }
#ifndef DROP_SLOW
void slow(int ms) { struct timespec t = {ms / 1000, (ms % 1000) * 1000000L}; nanosleep(&t, 0); }
#endif
"""

def readme_example() -> str:
    """The test the README shows, word for word."""
    from test_readme import blocks

    (example,) = [body for lang, body in blocks("In your tests: the pytest plugin") if lang == "python"]
    return example


def _plugin_installed() -> bool:
    return any(e.name == "nativereload" for e in entry_points(group="pytest11"))


@pytest.fixture
def project(pytester):
    """A user project: src/counter.c, run through the installed plugin (or -p when not installed)."""
    (pytester.path / "src").mkdir()
    (pytester.path / "src" / "counter.c").write_text("#include <time.h>\n" + COUNTER)
    return pytester


def run(pytester, *args):
    extra = [] if _plugin_installed() else ["-p", "nativereload.testing"]
    return pytester.runpytest_subprocess(*extra, "-p", "no:cacheprovider", *args, timeout=240)


@pytest.mark.timeout(300)
def test_the_readme_example_passes(project):
    example = readme_example()
    assert len(example.strip().splitlines()) <= 14      # "in a dozen lines"
    project.makepyfile(test_counter=example + textwrap.dedent("""

        def test_the_report(nativereload_registry, nativereload_build):
            v1 = nativereload_build(["src/counter.c"], defines={"VERSION": 1})
            report = assert_reload_safe(nativereload_registry, "counter", builds=[v1], reloads=5,
                                        workload=lambda counter: counter.add(2, 3) == 5)
            assert report.reloads == 5 and report.calls > 0 and report.generation == 6
        """))
    result = run(project)
    result.assert_outcomes(passed=2)


@pytest.mark.timeout(300)
def test_a_rejected_result_fails_with_a_precise_message(project):
    project.makepyfile(test_counter=textwrap.dedent("""\
        from nativereload.testing import assert_reload_safe


        def test_reload(nativereload_registry, nativereload_build):
            v1 = nativereload_build("src/counter.c", defines=["VERSION=1", "OFFSET=0"])
            v2 = nativereload_build("src/counter.c", defines=["VERSION=2", "OFFSET=1"])   # a bug in v2

            def workload(counter):
                assert counter.add(2, 3) == 5, "add(2, 3) is not 5"

            assert_reload_safe(nativereload_registry, "counter", builds=[v1, v2], workload=workload, reloads=20)
        """))
    result = run(project)
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "assert_reload_safe('counter'):" in text and "of 20 reload(s) under 4 thread(s)" in text
    assert "the workload rejected a result at test_counter.py:9 (first near generation" in text
    assert "add(2, 3) is not 5" in text
    assert "nativereload/testing.py" not in text        # no traceback of the plugin's internals


@pytest.mark.timeout(300)
def test_a_refused_reload_and_an_undrained_image_fail(project):
    project.makepyfile(test_counter=textwrap.dedent("""\
        from nativereload.testing import assert_reload_safe

        CDEF = "long add(long, long); int version(void); void slow(int);"


        def test_missing_symbol(nativereload_registry, nativereload_build):
            v1 = nativereload_build("src/counter.c", defines={"OFFSET": 0})
            v2 = nativereload_build("src/counter.c", defines={"OFFSET": 0, "DROP_SLOW": None})
            assert_reload_safe(nativereload_registry, "counter", builds=[v1, v2], cdef=CDEF,
                               workload=lambda counter: counter.add(1, 1) == 2)


        def test_a_call_that_does_not_return(nativereload_registry, nativereload_build):
            v1 = nativereload_build("src/counter.c", defines={"OFFSET": 0})
            assert_reload_safe(nativereload_registry, "counter", builds=[v1, v1], cdef=CDEF, reloads=3,
                               threads=1, workload=lambda counter: counter.slow(3000), drain_timeout=0.5)
        """))
    result = run(project)
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    assert "reload 1 (to build 1:" in text and "was refused: SymbolError" in text and "'slow'" in text
    assert "workload thread(s) still inside a call 0.5 s after the reloads ended" in text


@pytest.mark.timeout(300)
def test_a_cmake_target_builds_with_defines(project):
    project.makefile(".txt", CMakeLists=textwrap.dedent("""\
        cmake_minimum_required(VERSION 3.16)
        project(counter C)
        find_package(nativereload REQUIRED)
        set(VERSION 1 CACHE STRING "")
        nativereload_add_module(counter SOURCES src/counter.c)
        target_compile_definitions(counter PRIVATE VERSION=${VERSION} OFFSET=0)
        """))
    project.makepyfile(test_counter=textwrap.dedent("""\
        from nativereload.testing import assert_reload_safe


        def test_reload(nativereload_registry, nativereload_build):
            v1 = nativereload_build(cmake=".", target="counter", defines={"VERSION": 1})
            v2 = nativereload_build(cmake=".", target="counter", defines={"VERSION": 2})
            assert v1 != v2
            seen = set()

            def workload(counter):
                seen.add(counter.version())

            assert_reload_safe(nativereload_registry, "counter", builds=[v1, v2], reloads=30,
                               cdef="int version(void);", workload=workload)
            assert seen == {1, 2}
        """))
    result = run(project)
    result.assert_outcomes(passed=1)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (STB_GNU_UNIQUE)")
def test_the_registry_fixture_fails_a_test_that_leaks(project):
    for n in ("", "2"):       # two: the first one leaked keeps the next one's unique symbol bound to itself
        (project.path / "src" / f"unique{n}.cpp").write_text(textwrap.dedent(f"""\
            inline int &unique_counter{n}() {{ static int value = 0; return value; }}
            extern "C" int unique_next(void) {{ return ++unique_counter{n}(); }}
            """))
    project.makepyfile(test_leak=textwrap.dedent("""\
        from nativereload.testing import assert_reload_safe


        def test_leaks(nativereload_registry, nativereload_build):
            # -fgnu-unique undoes the flag nativereload adds for C++: glibc then keeps the library mapped.
            lib = nativereload_build("src/unique.cpp", cflags=["-fgnu-unique"])
            mod = nativereload_registry.load("unique", cdef="int unique_next(void);", file=lib)
            assert mod.unique_next() == 1
            nativereload_registry.reload("unique")


        def test_leaks_under_assert_reload_safe(nativereload_registry, nativereload_build):
            lib = nativereload_build("src/unique2.cpp", cflags=["-fgnu-unique"])
            assert_reload_safe(nativereload_registry, "unique", builds=[lib, lib], reloads=3,
                               cdef="int unique_next(void);", workload=lambda m: m.unique_next() > 0)


        def test_clean(nativereload_registry, nativereload_build):
            lib = nativereload_build("src/counter.c", defines={"OFFSET": 0})
            mod = nativereload_registry.load("counter", cdef="long add(long, long);", file=lib)
            nativereload_registry.reload("counter")
            assert mod.add(1, 2) == 3
        """))
    result = run(project)
    result.assert_outcomes(passed=2, failed=1, errors=2)    # test_leaks passes its call, then errors at teardown
    text = result.stdout.str()
    assert "ERROR at teardown of test_leaks" in text
    assert "assert_reload_safe('unique'):" in text and "generation 1 leaked: the dynamic loader kept" in text
    assert "UserWarning" not in text
    assert "nativereload_registry: the registry did not clean up after the test" in text
    assert "module 'unique' generation 1 leaked" in text and "-fno-gnu-unique" in text


def test_the_plugin_is_registered_by_the_package():
    if not _plugin_installed():
        pytest.skip("nativereload is not installed here (only on PYTHONPATH): no entry points")
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "nativereload"]
    assert entry.value == "nativereload.testing"
