#!/bin/sh
# The GitHub Action's step: register QUSD_TARGETS with QUSD_FLAGS, run each
# target's test program through the kernel (unless QUSD_VERIFY=false), print
# the resulting table, fail the step with an annotation on any error.
# QUSD_SKIP_INSTALL=1 skips installing qemu-user-static (tests, prepared hosts).
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-python3}"
fail() { echo "::error title=qusd binfmt::$1"; exit 1; }

if [ "${QUSD_SKIP_INSTALL:-0}" != 1 ] && ! ls /usr/bin/qemu-*-static >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq qemu-user-static; } >/dev/null \
        || fail "could not install qemu-user-static with apt-get"
fi

# One argument: qusd-binfmt splits it on spaces, commas and newlines itself,
# so a trailing newline from a YAML block is harmless.
if ! out="$(PYTHONPATH="$here" "$py" -m qusd.oneshot register --flags "${QUSD_FLAGS:-F}" -- "${QUSD_TARGETS:-}" 2>&1)"; then
    fail "$(echo "$out" | tail -n 1)"
fi
echo "$out"
# Prove it: each target's built-in test program through the kernel.
if [ "${QUSD_VERIFY:-true}" = true ]; then
    if ! checked="$(PYTHONPATH="$here" "$py" -m qusd.oneshot verify -- "${QUSD_TARGETS:-}" 2>&1)"; then
        echo "$checked"
        fail "verify: $(echo "$checked" | grep -m 1 -E '^[a-z0-9_]+: ' || echo "$checked" | tail -n 1)"
    fi
    echo "$checked"
fi
json="$(PYTHONPATH="$here" "$py" -m qusd.oneshot --json list)" || fail "could not list binfmt_misc"
if [ -n "${GITHUB_OUTPUT:-}" ]; then
    { echo "registrations<<QUSD_EOF"; echo "$json"; echo "QUSD_EOF"; } >> "$GITHUB_OUTPUT"
fi
