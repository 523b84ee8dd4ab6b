#!/bin/sh
# Install the Debian packages qusd builds and tests with, when they are missing.
# Run by `make`; does nothing when everything is already there.
set -eu

missing=""
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" || missing="$missing $1"; }

# curl, systemd (systemd-analyze, systemd-socket-activate, systemd-sysusers),
# passwd (useradd) and groff-base (the man pages) are for the tests; so are
# the real peers and consumers the tests use: qemu-user (a dynamic
# interpreter), podman, buildah, uidmap and crun (images and containers, also
# rootless), mmdebstrap and debootstrap (base images, the VM's root),
# qemu-system-x86 and qemu-utils (the boot test, tools/vm), lintian (the
# package), inotify-tools; arch-test (mmdebstrap's check for a foreign
# architecture's emulation) and sudo (the GitHub Action's step as a runner's
# user runs it); bash-completion, zsh and fish (the shell completion,
# completed by each).
for pkg in qemu-user-static libsystemd-dev pkg-config gcc util-linux curl systemd passwd make groff-base \
    qemu-user podman buildah uidmap crun fuse-overlayfs slirp4netns mmdebstrap debootstrap \
    qemu-system-x86 qemu-utils lintian inotify-tools arch-test sudo bash-completion zsh fish; do
    need "$pkg"
done
# The interpreter that builds the venv needs its headers (systemd-python
# compiles) and the venv module; Debian splits both out of python3.
PY="${PYTHON:-python3}"
"$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need python3-dev
"$PY" -c 'import ensurepip' 2>/dev/null || need python3-venv

[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages:$missing" >&2
    echo "setup: run 'sudo apt-get install$missing' or run make as root" >&2
    exit 1
fi
echo "setup: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "setup: apt-get update reported errors; trying the install anyway" >&2
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
