#!/usr/bin/env bash
# Free-threaded CPython 3.13t with the GIL off (issue 13): the whole suite on the C gate, the tests
# that make calls on the pure-Python gate, and the stress test at 8 callers and 2,000 reloads.
#
#   .ci/freethreaded.sh            # first run: builds 3.13t (~7 min on 2 cores), then ~4 min
#
# CPython 3.13t is built once from Debian's source package python3.13 (a deb-src
# entry for unstable; 3.14 sources are not downloadable here), with
# ./configure --disable-gil (pip comes from ensurepip in the virtualenv), and kept with its
# virtualenv under ${XDG_CACHE_HOME:-$HOME/.cache}/nativereload-ci/ for later runs.
# cffi 2.x refuses to build on 3.13t; cffi 1.17.1 builds but turns the GIL back
# on when imported unless PYTHON_GIL=0 forces it off: every run sets it, and
# the script checks the GIL really is off.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nativereload-ci"
prefix="$cache/python3.13t"
python="$prefix/bin/python3.13t"
venv="$cache/venv-3.13t"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x "$python" ]; then
    echo "--- building free-threaded CPython 3.13 into $prefix (once)"
    packages="dpkg-dev build-essential libffi-dev libssl-dev zlib1g-dev libbz2-dev liblzma-dev libsqlite3-dev
              libreadline-dev"
    # shellcheck disable=SC2086
    as_root apt-get install -y -q $packages >/dev/null 2>&1 || { as_root apt-get update -q >/dev/null && \
        as_root apt-get install -y -q $packages >/dev/null; }
    sources=/etc/apt/sources.list.d/nativereload-unstable-src.list
    if ! grep -rqs "deb-src .*unstable" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb-src http://deb.debian.org/debian unstable main" | as_root tee "$sources" >/dev/null
    fi
    as_root apt-get update -q >/dev/null
    build="$(mktemp -d "${TMPDIR:-/tmp}/nativereload-py313t-XXXXXX")"
    trap 'rm -rf "$build"' EXIT
    # The index may list versions whose files are gone (404): try each, newest first.
    fetched=""
    for version in $(apt-cache showsrc python3.13 | sed -n 's/^Version: //p' | sort -rV); do
        if (cd "$build" && apt-get source -q --download-only "python3.13=$version" >/dev/null 2>&1); then
            fetched="$version"
            break
        fi
        rm -f "$build"/python3.13_*
    done
    [ -n "$fetched" ] || { echo "error: no python3.13 source package could be downloaded"; exit 1; }
    echo "    python3.13 $fetched"
    (cd "$build" && dpkg-source -x --no-check ./*.dsc src >/dev/null)
    # Debian's patch disables ensurepip for an installed ("system") Python, and
    # allows it in a virtualenv: pip comes with the venv below.
    (cd "$build/src" && ./configure -q --prefix="$prefix" --disable-gil --with-ensurepip=no \
        --disable-test-modules >/dev/null && make -s -j"$(nproc)" >"$build/make.log" 2>&1 \
        && make -s install >>"$build/make.log" 2>&1) || { tail -30 "$build/make.log"; exit 1; }
    rm -rf "$venv"
fi
"$python" -c 'import sys; assert not sys._is_gil_enabled(), "not a free-threaded build"'

if [ ! -f "$venv/.ready" ]; then
    rm -rf "$venv"
    "$python" -m venv --without-pip "$venv"
    # Debian's site.py looks for lib/python3.13/site-packages, the venv has
    # lib/python3.13t/site-packages (the free-threaded ABI suffix): link the two.
    [ -e "$venv/lib/python3.13" ] || ln -s python3.13t "$venv/lib/python3.13"
    "$venv/bin/python" -m ensurepip >/dev/null
    # watchfiles has no 3.13t wheel here: its tests skip without it (the polling path still runs).
    "$venv/bin/python" -m pip install -q "cffi==1.17.1" "pytest>=7" "pytest-timeout>=2" setuptools wheel 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    touch "$venv/.ready"
fi
export PYTHON_GIL=0
# The C gate, built in place for this interpreter (a copy of the tree: the caller's build stays as it is).
work="$(mktemp -d "${TMPDIR:-/tmp}/nativereload-ft-XXXXXX")"
trap 'rm -rf "$work" ${build:+"$build"}' EXIT
git ls-files -z | xargs -0 tar cf - | tar xf - -C "$work"
cd "$work"
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
py="$venv/bin/python"
"$py" - <<'EOF'
import sys
import nativereload
from nativereload import gate
assert not sys._is_gil_enabled(), "the GIL came back on (cffi 1.17.1 without PYTHON_GIL=0?)"
assert gate.C is not None, "the C gate did not build for 3.13t"
print(f"free-threaded {sys.version.split()[0]}: GIL off, C gate built, the Python gate is {gate.PYTHON.name}")
EOF
export NATIVERELOAD_SAMPLES_CACHE="$work/samples-cache"
mkdir -p "$NATIVERELOAD_SAMPLES_CACHE"
echo "--- 3.13t, C gate"
"$py" -m pytest -q -p no:cacheprovider
echo "--- 3.13t, pure-Python gate (its lock-based variant), the tests that make calls"
NATIVERELOAD_PURE_PYTHON=1 "$py" -c 'from nativereload import gate; assert gate.implementation() is gate.PYTHON'
NATIVERELOAD_PURE_PYTHON=1 "$py" -m pytest -q -p no:cacheprovider tests/test_gate.py tests/test_registry.py \
    tests/test_reload.py tests/test_objects.py tests/test_contracts.py tests/test_lifecycle.py tests/test_stress.py \
    tests/test_image.py tests/test_crash_safety.py
echo "--- 3.13t, stress: 8 callers, 2,000 reloads, each gate"
NATIVERELOAD_STRESS_CALLERS=8 NATIVERELOAD_STRESS_RELOADS=2000 \
    "$py" -m pytest -q -p no:cacheprovider "tests/test_stress.py::test_threads_calling_through_200_reloads"
