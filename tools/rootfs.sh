#!/bin/sh
# A minimal Debian root filesystem as a tarball, made locally with mmdebstrap
# (no image registry needed): the base image the container tests build on.
#
#   tools/rootfs.sh [-s SUITE] [-i PKG[,PKG...]] ARCH [OUT.tar]
#
#   ARCH   a Debian architecture: amd64, arm64, armhf, ppc64el, s390x, ...
#   -s     the suite (default: bookworm)
#   -i     extra packages (default: none; the result is like debian:SUITE-slim)
#   OUT    also copy the tarball there
#
# Prints the path of the cached tarball (one line, nothing else on stdout).
# Use it as a base image with `podman import [--arch ARCH] TARBALL NAME`.
#
# The tarball is cached under $QUSD_CACHE_DIR/rootfs (default
# /var/cache/qusd-test as root, else ${XDG_CACHE_HOME:-~/.cache}/qusd-test),
# named after its inputs (this script, suite, arch, packages, mirror), so a
# fresh clone on the same machine reuses it; concurrent callers wait on a lock.
#
# Like Docker's slim images it has no documentation, man pages or locales,
# and /usr is merged where the suite has usr-is-merged (bookworm and later).
# It has no /dev entries: a container runtime makes /dev, and device nodes
# cannot be created when an image is unpacked in a user namespace.
#
# mmdebstrap runs in a qusd sandbox (a user namespace with its own
# binfmt_misc, Linux >= 6.7); for a foreign ARCH the sandbox registers qusd's
# own QEMU emulation first, so the foreign maintainer scripts run through it
# and never through the host's binfmt_misc table. Needs root (or the sandbox's
# identity map would not cover the files' owners), mmdebstrap and arch-test.
set -eu

suite=bookworm
include=""
while getopts s:i: opt; do
    case "$opt" in
        s) suite="$OPTARG" ;;
        i) include="$OPTARG" ;;
        *) echo "usage: $0 [-s SUITE] [-i PKG,...] ARCH [OUT.tar]" >&2; exit 64 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 [-s SUITE] [-i PKG,...] ARCH [OUT.tar]" >&2
    exit 64
fi
arch="$1"
out="${2:-}"
mirror="${QUSD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$(id -u)" != 0 ]; then
    echo "rootfs.sh: run as root: the sandbox maps only root's own ids otherwise" >&2
    exit 77
fi
for tool in mmdebstrap arch-test; do
    command -v "$tool" >/dev/null || {
        echo "rootfs.sh: $tool is missing: run 'make setup' (tools/setup-system.sh installs it)" >&2
        exit 69
    }
done

if [ -n "${QUSD_CACHE_DIR:-}" ]; then
    cache="$QUSD_CACHE_DIR"
elif [ "$(id -u)" = 0 ]; then
    cache=/var/cache/qusd-test
else
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/qusd-test"
fi
cache="$cache/rootfs"
mkdir -p "$cache"

key="$({ cat "$0"; echo "$suite $arch $include $mirror"; } | sha256sum | cut -c1-16)"
tarball="$cache/$suite-$arch-$key.tar"

# The Python that runs qusd's sandbox: qusd.cli needs only the standard library.
py="${PYTHON:-python3}"
if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; fi

build() {
    # Emulate ARCH unless the host runs it (same family, as QEMU's script
    # decides; i386 on amd64 runs natively).
    register=""
    native="$(PYTHONPATH="$root" "$py" -c 'import sys; from qusd import catalog as c; h = c.family_of(c.host_machine()); print(int(c.family_of(sys.argv[1]) == h))' "$arch")"
    if [ "$native" != 1 ]; then register="--register $arch"; fi
    tmp="$tarball.tmp.$$"
    # shellcheck disable=SC2086
    set -- $register
    if [ -n "$include" ]; then set -- "$@" -- mmdebstrap --include="$include"; else set -- "$@" -- mmdebstrap; fi
    PYTHONPATH="$root" "$py" -m qusd.cli sandbox "$@" \
        --variant=minbase --arch="$arch" --format=tar --skip=output/dev \
        --hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        "$suite" "$tmp" "$mirror" >&2 || { rm -f "$tmp"; exit 1; }
    mv "$tmp" "$tarball"
}

(
    flock 9
    if [ ! -s "$tarball" ]; then
        echo "rootfs.sh: making $tarball (mmdebstrap $suite $arch)" >&2
        build
    fi
) 9>"$tarball.lock"

if [ -n "$out" ]; then
    ln -f "$tarball" "$out" 2>/dev/null || cp "$tarball" "$out"
fi
echo "$tarball"
