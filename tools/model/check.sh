#!/usr/bin/env bash
# Check the gate model (tools/model/gate.pml) with spin: every scenario of the
# protocol must pass, and every broken variant must be caught.
#
#   tools/model/check.sh            # under a minute; needs spin (apt-get install spin) and a C compiler
#
# All six scenarios are explored exhaustively in one run (pan -DSAFETY:
# assertions, and invalid end states, i.e. a process waiting for ever). Exits 1
# if the protocol fails, or a broken variant passes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/nativereload-model-XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp "$here/gate.pml" "$work/"
cd "$work"

# check DEFINES... : explore every scenario (init picks each); print one line; return 0 if it passes
check() {
    local output
    spin "$@" -a gate.pml >/dev/null
    cc -O2 -DSAFETY -DMEMLIM=2048 -o pan pan.c
    output="$(./pan -m200000 2>&1)"
    rm -f gate.pml.trail pan pan.*
    if grep -q "errors: 0" <<<"$output" && ! grep -q "error:" <<<"$output"; then
        echo "  passes: $(grep -o '[0-9]* states, stored' <<<"$output"), depth $(grep -o 'depth reached [0-9]*' <<<"$output" | cut -d' ' -f3)"
        return 0
    fi
    echo "  fails: $(grep -m1 -E 'violated|invalid end state|error' <<<"$output")"
    return 1
}

status=0
echo "gate model: the protocol"
if ! check; then
    echo "gate model: the protocol FAILED"
    status=1
fi
for variant in "-DNO_ENTERS_RECHECK" "-DENTERS_FIRST -DNO_ENTERS_RECHECK" "-DNO_RETIRED_CHECK" \
               "-DEXCLUSIVE_ENTERS_FIRST"; do
    echo "gate model: broken variant $variant (must fail)"
    # shellcheck disable=SC2086
    if check $variant; then
        echo "gate model: broken variant $variant was NOT caught"
        status=1
    fi
done
if [ "$status" = 0 ]; then
    echo "gate model: ok (the protocol passes every scenario; every broken variant is caught)"
fi
exit "$status"
