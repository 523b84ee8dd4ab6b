#!/bin/sh
# Build qusd's Debian package with Debian's tooling (dpkg-buildpackage,
# debhelper, dh-virtualenv), out of the repository root: the sources are
# copied into build/deb/qusd-VERSION/ with packaging/debian as debian/, and
# the .deb lands in dist/. Run by `make deb`; as root, installs the missing
# Build-Depends with apt-get first.
#
#   sh packaging/build-deb.sh              build dist/qusd_VERSION_ARCH.deb
#   sh packaging/build-deb.sh --print-deb  print that path, build nothing
set -eu
cd "$(dirname "$0")/.."

# The upstream version is pyproject.toml's; the Debian revision comes from
# debian/changelog. When pyproject.toml has moved on, the staged changelog
# gets a new entry VERSION-1 (bump packaging/debian/changelog to keep it).
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$version" ] || { echo "build-deb: no version in pyproject.toml" >&2; exit 1; }
changelog_version=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "${changelog_version%-*}" = "$version" ]; then
    debversion=$changelog_version
else
    debversion=$version-1
fi
arch=$(dpkg --print-architecture)
deb=dist/qusd_${debversion}_${arch}.deb
if [ "${1:-}" = --print-deb ]; then
    echo "$deb"
    exit 0
fi

# The maintainer: packaging/maintainer.env, the one place that names them.
# Not the caller's DEBFULLNAME/DEBEMAIL: the package is the same whoever
# builds it.
DEBFULLNAME='' DEBEMAIL=''
# shellcheck source=packaging/maintainer.env
. ./packaging/maintainer.env
maintainer="$DEBFULLNAME <$DEBEMAIL>"
# What lintian takes for a real address (a host in a domain); no character
# that sed's replacement below would read.
if ! printf '%s\n' "$maintainer" \
    | grep -Eqx "[^<>|&@\\]+ <[^<>|&@\\ ]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+>" \
    || [ "${DEBEMAIL##*.}" = localdomain ] || [ "${DEBEMAIL##*.}" = invalid ]; then
    echo "build-deb: packaging/maintainer.env: '$maintainer' is not 'Full Name <user@host.domain>'" >&2
    exit 1
fi

top=$(pwd)
stage=$top/build/deb/qusd-$version
echo "build-deb: staging the source package in ${stage#"$top"/}"
rm -rf "$top/build/deb"
mkdir -p "$stage"
# What `pip install .` needs, without caches and build leftovers, the
# man pages (debian/qusd.manpages), and the pins debian/rules installs with.
tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    pyproject.toml README.md qusd systemd packaging/qusd.toml packaging/constraints.txt \
    packaging/completions.sh packaging/oci docs/man | tar -xf - -C "$stage"
# debian/ links to the units in systemd/: copy what they point at.
cp -RL packaging/debian "$stage/debian"
for f in control changelog copyright; do
    sed -i "s|@MAINTAINER@|$maintainer|g" "$stage/debian/$f"
done
if [ "$debversion" != "$changelog_version" ]; then
    echo "build-deb: pyproject.toml says $version, debian/changelog $changelog_version: adding $debversion" >&2
    {
        printf 'qusd (%s) unstable; urgency=medium\n\n' "$debversion"
        printf '  * Upstream version %s (entry made by packaging/build-deb.sh).\n\n' "$version"
        printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
        sed "s|@MAINTAINER@|$maintainer|g" packaging/debian/changelog
    } >"$stage/debian/changelog"
fi

# Build-Depends: dpkg-checkbuilddeps (dpkg-dev) says what is missing, and
# apt-get build-dep installs exactly that from debian/control.
need_install=no
if ! command -v dpkg-checkbuilddeps >/dev/null 2>&1; then
    need_install=yes
elif ! (cd "$stage" && dpkg-checkbuilddeps) 2>/dev/null; then
    need_install=yes
fi
if [ "$need_install" = yes ]; then
    if [ "$(id -u)" != 0 ]; then
        (cd "$stage" && dpkg-checkbuilddeps) || true
        echo "build-deb: missing Build-Depends; run make as root, or" >&2
        echo "build-deb: sudo apt-get build-dep $stage" >&2
        exit 1
    fi
    echo "build-deb: installing the Build-Depends of $stage/debian/control"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || echo "build-deb: apt-get update reported errors; trying the install anyway" >&2
    apt-get build-dep -y -qq --no-install-recommends "$stage"
    (cd "$stage" && dpkg-checkbuilddeps)
fi

# Debian's tools only: no pyenv shims or venvs of the caller, no make flags
# of the calling make leaking into debian/rules.
cd "$stage"
env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b
cd "$top"

built=build/deb/$(basename "$deb")
mkdir -p dist
rm -f dist/qusd_*_"$arch".deb
mv "$built" "$deb"
touch "$deb"
echo "build-deb: $deb"
