#!/bin/sh
# The GitHub Action's step: action.yml's `run:` executes exactly this script,
# with the inputs in QUSD_TARGETS, QUSD_PLATFORMS, QUSD_FLAGS, QUSD_REPLACE,
# QUSD_VERIFY.
#
# As root (a container job) it runs as it is; otherwise through the runner's
# passwordless sudo. When the runner has no static QEMU interpreter (or no
# python3) it installs qemu-user-static (and python3) with apt-get, output
# shown in a log group. Then qusd.compat registers, prints every outcome as a
# table, runs each target's built-in test program through the kernel (unless
# QUSD_VERIFY=false), annotates each failure and sets the `registrations` and
# `platforms` outputs. Any failure fails the step (exit 1) with an `::error` annotation.
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
fail() {
    echo "::error title=qusd binfmt::$1"
    exit 1
}

# The Python the job would use (actions/setup-python's, or the system's),
# found before sudo resets PATH.
py="${QUSD_PYTHON:-$(command -v python3 || true)}"
export QUSD_PYTHON="$py"

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 \
        || fail "registering binfmt_misc entries needs root, and $(id -un) is not root and there is no sudo: run the job as root or install sudo"
    sudo -n true >/dev/null 2>&1 \
        || fail "registering binfmt_misc entries needs root, and sudo asks $(id -un) for a password: allow passwordless sudo (as GitHub's runners do) or run the job as root"
    exec sudo -n --preserve-env=QUSD_TARGETS,QUSD_PLATFORMS,QUSD_FLAGS,QUSD_REPLACE,QUSD_VERIFY,QUSD_PYTHON,GITHUB_OUTPUT,GITHUB_ACTIONS \
        sh "$0"
fi

# qusd-binfmt runs on Python >= 3.10; say so before changing anything.
check_python() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1 \
        || fail "qusd binfmt needs Python 3.10 or later, and $1 is $("$1" -V 2>&1 | head -n 1): use a newer runner image or run actions/setup-python before this step"
}
[ -z "$py" ] || check_python "$py"

have_qemu() {
    for f in /usr/bin/qemu-*-static /usr/local/bin/qemu-*-static; do
        [ -x "$f" ] && return 0
    done
    return 1
}
need=""
[ -n "$py" ] || need="python3"
have_qemu || need="$need qemu-user-static"
if [ -n "$need" ]; then
    command -v apt-get >/dev/null 2>&1 \
        || fail "missing$([ -n "$py" ] || echo ' python3 and') static QEMU interpreters, and no apt-get to install$need: install them before this step"
    echo "::group::apt-get install$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update || echo "::warning title=qusd binfmt::apt-get update reported errors; trying the install anyway"
    # shellcheck disable=SC2086
    if ! apt-get install -y --no-install-recommends $need; then
        echo "::endgroup::"
        fail "apt-get could not install$need (its output is in the group above)"
    fi
    echo "::endgroup::"
    if [ -z "$py" ]; then
        py="$(command -v python3)" || fail "python3 is still missing after apt-get install python3"
        check_python "$py"
    fi
fi

# From the Action's own directory: `-m` puts the working directory first on
# sys.path, and the job's workspace may hold anything.
cd "$here" || fail "cannot enter $here"
PYTHONPATH="$here" exec "$py" -m qusd.compat github-action
