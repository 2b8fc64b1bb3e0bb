#!/usr/bin/env bash
# Check the gate model (tools/model/gate.pml) with spin: every scenario of the
# protocol must pass, and every broken variant must be caught.
#
#   tools/model/check.sh            # about half a minute; needs spin (apt-get install spin) and a C compiler
#
# All six scenarios are explored exhaustively in one run (pan -DSAFETY:
# assertions, and invalid end states, i.e. a process waiting for ever): the
# protocol with two stripes of counters (the free-threaded C gate) and with one
# (the GIL build), then each broken variant with two. Exits 1 if the protocol
# fails, a broken variant passes, or the model does not build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/nativereload-model-XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp "$here/gate.pml" "$work/"
cd "$work"

# check DEFINES... : explore every scenario (init picks each); print one line;
# return 0 if it passes, 1 if it fails, 2 if spin or the compiler refused the model
# (so that a variant that does not build never counts as caught)
check() {
    local output
    if ! output="$(spin "$@" -a gate.pml 2>&1)"; then
        echo "  model error (spin): $(grep -m1 -i error <<<"$output")"
        return 2
    fi
    if ! output="$(cc -O2 -DSAFETY -DMEMLIM=2048 -o pan pan.c 2>&1)"; then
        echo "  model error (cc): $(grep -m1 -i error <<<"$output")"
        return 2
    fi
    output="$(./pan -m200000 2>&1)" || true
    rm -f gate.pml.trail pan pan.*
    if grep -q "errors: 0" <<<"$output" && ! grep -q "error:" <<<"$output"; then
        echo "  passes: $(grep -o '[0-9]* states, stored' <<<"$output"), depth $(grep -o 'depth reached [0-9]*' <<<"$output" | cut -d' ' -f3)"
        return 0
    fi
    echo "  fails: $(grep -m1 -E 'violated|invalid end state|error' <<<"$output")"
    return 1
}

status=0
for stripes in 2 1; do
    echo "gate model: the protocol, $stripes stripe(s)"
    if ! check "-DNSTRIPES=$stripes"; then
        echo "gate model: the protocol FAILED with $stripes stripe(s)"
        status=1
    fi
done
for variant in "-DNO_ENTERS_RECHECK" "-DENTERS_FIRST -DNO_ENTERS_RECHECK" "-DNO_RETIRED_CHECK" \
               "-DEXCLUSIVE_ENTERS_FIRST" "-DRECHECK_ONE_STRIPE" "-DINTERLEAVED_STRIPES -DEXIT_ON_OTHER_STRIPE"; do
    echo "gate model: broken variant $variant (must fail)"
    rc=0
    # shellcheck disable=SC2086
    check $variant || rc=$?
    if [ "$rc" = 0 ]; then
        echo "gate model: broken variant $variant was NOT caught"
        status=1
    elif [ "$rc" = 2 ]; then
        echo "gate model: broken variant $variant does not build"
        status=1
    fi
done
if [ "$status" = 0 ]; then
    echo "gate model: ok (the protocol passes every scenario; every broken variant is caught)"
fi
exit "$status"
