"""Shared fixtures: the sample modules, compiled once per session with CMake.

``samples`` maps a build name to a compiled .so file:
    v1, v2          csrc/samples/sample.c with SAMPLE_VERSION 1 and 2
    v3              the same with SAMPLE_VERSION 3
    nosym           v2 without scaled()
    undef           v2 calling a function no library defines (dlopen fails)
    big             v2 with 256 KiB of read-only padding: a process whose file size limit
                    (RLIMIT_FSIZE) is lower cannot store it (the cluster tests' refusing worker)
    unique          a C++ library glibc keeps mapped after dlclose
    objects1, objects2  csrc/samples/objects.c (objects that cross reloads) with SAMPLE_VERSION 1 and 2
    lifecycle1, lifecycle2  csrc/samples/lifecycle.c (init/fini hooks, state handed over) with SAMPLE_VERSION 1, 2
    lifecycle_crash, lifecycle_selftest3, lifecycle_hang
                    lifecycle v2 crashing in a constructor, failing its selftest, hanging in it (canary)
  csrc/samples/contract.c, each with its interface (contract.h) embedded, so it
  loads with no cdef; the variants change one declaration each:
    contract        the baseline: contract_version() returns 1
    contract_v2     new code, same interface: contract_version() returns 2
    contract_return contract_version() returns double (2.5): refused
    contract_param  contract_add(long, int), was (long, long): refused
    contract_struct struct contract_point's y is a long, was an int (size 8 -> 16): refused
    contract_enum   CONTRACT_SAFE is 3, was 2: refused
    contract_drop   no contract_scaled(): refused
    contract_add    adds contract_added(long) (returns x + 100): accepted
    contract_abort  the baseline's interface, and a constructor that aborts the
                    process: reading its interface must not load it (try it in
                    a subprocess only)
  (the contract variants other than contract/contract_v2 have contract_version() == 2)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]      # test_testing.py runs the plugin on small user projects

SAMPLE_CDEF = """
int version(void);
const char *version_string(void);
long add(long, long);
long scaled(long);
long counter_next(void);
double dot4(double, double, double, double);
long sum_bytes(const char *, long);
int wait_fd(int);
"""


OBJECTS_CDEF = """
typedef struct obj obj;
struct stream { long total; long (*step)(long); const char *made_by; };
int image_version(void);
obj *obj_new(long);
int obj_open(long, obj **);
long obj_value(obj *);
int obj_version(obj *);
long obj_sum(obj *, obj *);
int obj_free(obj *);
int obj_is_ours(obj *);
const char *obj_name(void);
int stream_init(struct stream *);
long stream_push(struct stream *, long);
int stream_end(struct stream *);
"""
WRONG_IMAGE = -1000

LIFECYCLE_CDEF = """
int lifecycle_version(void);
long lifecycle_next(void);
long lifecycle_reloads(void);
long lifecycle_work(long);
long lifecycle_violations(void);
int lifecycle_wait_fd(int);
"""
CONTRACT_VARIANTS = ("contract", "contract_v2", "contract_return", "contract_param", "contract_struct",
                     "contract_enum", "contract_drop", "contract_add", "contract_abort")


# .ci/run runs the suite three times: by default (every call path of gate_impl), with
# NATIVERELOAD_PURE_PYTHON=1 (everything on the pure-Python gate) and with NATIVERELOAD_CALLS=compiled
# (everything on the compiled path). In the last two, gate_impl's other paths would only repeat the first run.
if os.environ.get("NATIVERELOAD_PURE_PYTHON", "") not in ("", "0"):
    _ONLY_PATH: str | None = "python"
elif os.environ.get("NATIVERELOAD_CALLS") == "compiled":
    _ONLY_PATH = "compiled"
else:
    _ONLY_PATH = None


@pytest.fixture(scope="session", autouse=True)
def _compiled_cache(tmp_path_factory):
    """The tests' compiled call paths go to a cache of this session, never to the user's.

    Tests that do not choose a call path (through ``gate_impl``) run on the C gate as before
    (calls="gate"): the background compile of calls="auto" is tested on purpose in test_compiled.py.
    A cache given by the environment ($NATIVERELOAD_CACHE_DIR) is kept, so CI can reuse builds.
    """
    saved = {name: os.environ.get(name) for name in ("NATIVERELOAD_CACHE_DIR", "NATIVERELOAD_CALLS")}
    os.environ.setdefault("NATIVERELOAD_CACHE_DIR", str(tmp_path_factory.mktemp("compiled-cache")))
    os.environ.setdefault("NATIVERELOAD_CALLS", "gate")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def cmake_build(source: Path, build: Path, *defines: str) -> Path:
    """Configure (once) and build the project at ``source`` into ``build``; return ``build/modules``."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # NATIVERELOAD_PYTHON: this interpreter embeds the INTERFACE headers (it imports this checkout).
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DNATIVERELOAD_PYTHON={sys.executable}", *defines], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build)], check=True, stdout=subprocess.DEVNULL)
    return build / "modules"


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    # NATIVERELOAD_SAMPLES_CACHE=DIR: build once into DIR and reuse it in later
    # sessions (tools/mutate.py runs the tests hundreds of times).
    cache = os.environ.get("NATIVERELOAD_SAMPLES_CACHE")
    if cache:
        final = Path(cache) / "samples"
        if not (final / "complete").exists():
            partial = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
            build_samples(partial)
            (partial / "complete").touch()
            try:
                os.rename(partial, final)
            except OSError:              # another session finished first: use its build
                shutil.rmtree(partial, ignore_errors=True)
        return build_samples(final, build=False)
    return build_samples(tmp_path_factory.mktemp("samples"))


def build_samples(base: Path, build: bool = True) -> dict[str, Path]:
    """Build (or, with ``build=False``, just name) the sample libraries under ``base``."""
    built = {}
    for version in (1, 2, 3):
        variants = "ON" if version == 2 else "OFF"
        modules = base / f"v{version}" / "modules"
        if build:
            cmake_build(ROOT, base / f"v{version}", f"-DSAMPLE_VERSION={version}",
                        f"-DNATIVERELOAD_SAMPLE_VARIANTS={variants}")
        built[f"v{version}"] = modules / "sample.so"
        built[f"objects{version}"] = modules / "objects.so"
        built[f"lifecycle{version}"] = modules / "lifecycle.so"
        if version == 2:
            built["nosym"] = modules / "sample_nosym.so"
            built["undef"] = modules / "sample_undef.so"
            built["big"] = modules / "sample_big.so"
            built["unique"] = modules / "unique.so"
            for variant in CONTRACT_VARIANTS + ("lifecycle_crash", "lifecycle_selftest3", "lifecycle_hang"):
                built[variant] = modules / f"{variant}.so"
    for path in built.values():
        assert path.is_file(), path
    return built


def install(source: Path, target: Path) -> Path:
    """Put ``source`` at ``target`` the safe way: write a temporary file, then rename over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


@pytest.fixture
def moddir(tmp_path) -> Path:
    """An empty module directory for one test."""
    path = tmp_path / "modules"
    path.mkdir()
    return path


@pytest.fixture
def short_tmp_path() -> Path:
    """A fresh directory with a short name (/tmp/nrt-XXXXXXXX), removed afterwards.

    For Unix sockets: a socket path has at most 107 bytes, and pytest's
    tmp_path (/tmp/pytest-of-USER/pytest-N/<test name>N/) can use most of them.
    """
    path = Path(tempfile.mkdtemp(prefix="nrt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmpdir_for_copies(tmp_path) -> Path:
    """A private tmpdir for a registry's copies, so a test can see exactly what it left."""
    path = tmp_path / "copies"
    path.mkdir()
    return path


@pytest.fixture
def reg(moddir, tmpdir_for_copies, gate_impl):
    """A Registry searching ``moddir``, copying into ``tmpdir_for_copies``, once per gate implementation."""
    from nativereload import Registry

    registry = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    yield registry
    registry.close(timeout=10)


@pytest.fixture(params=["python", "c", "compiled"])
def gate_impl(request, monkeypatch):
    """Run a test once per call path: the pure-Python gate, the C gate, and the compiled path behind the C gate.

    "c" and "compiled" need the C gate; "compiled" also a C compiler (registries made during the test
    compile their call path during load: calls="compiled", through $NATIVERELOAD_CALLS).
    """
    from nativereload import gate

    only = _ONLY_PATH
    if only is not None and request.param != only:
        pytest.skip(f"this run is the {only!r} one (the default run covers every call path)")
    if request.param in ("c", "compiled"):
        if gate.C is None:
            pytest.skip("C gate not built in this environment")
        monkeypatch.delenv("NATIVERELOAD_PURE_PYTHON", raising=False)
        monkeypatch.setenv("NATIVERELOAD_CALLS", "gate" if request.param == "c" else "compiled")
        if request.param == "compiled":
            from nativereload.compiled import cache

            if cache.compiler() is None:
                pytest.skip("no C compiler for the compiled call path")
    else:
        monkeypatch.setenv("NATIVERELOAD_PURE_PYTHON", "1")
    return request.param


def private_copies(tmpdir: Path) -> list[str]:
    """Every file a registry left under ``tmpdir`` other than its directories' lock files, sorted."""
    return sorted(str(path) for path in Path(tmpdir).rglob("*") if path.is_file() and path.name != ".lock")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def mapped_paths() -> set[str]:
    """The files mapped into this process (from /proc/self/maps), " (deleted)" suffixes removed."""
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
    return paths


def run_python(code: str, *, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for scenarios that may crash the process)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def _system_libdir() -> Path:
    """Where Debian puts the system's libraries: /usr/lib/<multiarch triplet>."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    if not triplet:
        try:
            triplet = subprocess.run(["cc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
        except OSError:
            triplet = ""
    return Path("/usr/lib") / triplet if triplet else Path("/usr/lib")


SYSTEM_LIBDIR = _system_libdir()


def require_real_library(*paths: str | Path) -> None:
    """Skip unless every path exists (a system header or library); in CI, fail instead.

    CI sets NATIVERELOAD_REAL_LIBRARIES=required after installing the -dev
    packages (libsqlite3-dev zlib1g-dev libzstd-dev liblz4-dev libxxhash-dev),
    so the real-library tests cannot silently skip there.
    """
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        message = f"not installed: {', '.join(missing)} (apt-get install the -dev package)"
        if os.environ.get("NATIVERELOAD_REAL_LIBRARIES") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# An i386 library: the ELF tests' 32-bit shape (REL relocations, 32-bit tables).
X32_SOURCE = r"""
static int counter;
int f(void) { return ++counter; }
int g(void) { return counter; }
int (*table[2])(void) = {f, g};
static void early(void) { counter = 1; }
void (*init_slot)(void) __attribute__((section(".init_array"), used)) = early;
"""


@pytest.fixture(scope="session")
def x32(tmp_path_factory):
    """An i386 shared library, linked without the C runtime (no 32-bit libc needed to build it)."""
    base = tmp_path_factory.mktemp("x32")
    source = base / "x32.c"
    source.write_text(X32_SOURCE)
    script = base / "x32.map"
    script.write_text("X1 { global: f; g; table; local: *; };\n")       # version definitions too
    output = base / "x32.so"
    result = subprocess.run(["cc", "-m32", "-shared", "-fPIC", "-nostdlib", "-O2", f"-Wl,--version-script={script}",
                             "-o", str(output), str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot build a 32-bit library here: {result.stderr[-200:]}")
    return output
