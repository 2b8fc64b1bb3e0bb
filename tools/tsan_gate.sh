#!/usr/bin/env bash
# Run the C gate's stress and gate tests under ThreadSanitizer (issue 13).
#
#   tools/tsan_gate.sh [PYTHON]        # default: python3; needs gcc with libtsan
#
# Copies the repository to a temporary directory, builds nativereload/_gate with
# -fsanitize=thread there, and runs tests/test_stress.py and the C-gate tests of
# tests/test_gate.py with libtsan preloaded into the (uninstrumented) interpreter.
# Prints every ThreadSanitizer report and a summary line; exits 1 if there was one.
# With a GIL build, every gate access happens while holding the GIL, whose
# mutex TSan sees; a free-threaded interpreter (PYTHON=python3.13t) is the
# stronger test.
set -euo pipefail
python="${1:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/nativereload-tsan-XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -z | xargs -0 tar cf - | tar xf - -C "$work")
include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
suffix="$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
gcc -shared -fPIC -fsanitize=thread -O1 -g -std=c11 -I"$include" "$work/csrc/_gate.c" \
    -o "$work/nativereload/_gate$suffix"
export PYTHONPATH="$work" NATIVERELOAD_SAMPLES_CACHE="$work/samples-cache"
mkdir -p "$NATIVERELOAD_SAMPLES_CACHE"
cd "$work"
# Build the sample libraries without the sanitizer preloaded (CMake and the compiler need not run under it).
"$python" -m pytest -q -p no:cacheprovider tests/test_elf.py -k a_built_library >/dev/null
LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" \
TSAN_OPTIONS="halt_on_error=0 exitcode=0 log_path=$work/tsan-report" \
    "$python" -m pytest -q -p no:cacheprovider tests/test_stress.py tests/test_gate.py -k "c]" \
    -o addopts="" 2>&1 | tail -3
reports=$(cat "$work"/tsan-report.* 2>/dev/null | grep -c "WARNING: ThreadSanitizer" || true)
cat "$work"/tsan-report.* 2>/dev/null || true
echo "tsan_gate: $reports ThreadSanitizer report(s) with $("$python" -c 'import sys; print(sys.version.split()[0])')"
[ "$reports" = 0 ]
