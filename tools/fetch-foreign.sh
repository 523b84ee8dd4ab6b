#!/bin/sh
# Fetch Debian's busybox-static for the foreign architectures the tests run,
# into DEST/<debian-arch>/busybox. Idempotent: present files are kept.
#
# apt downloads a foreign package only once dpkg knows the architecture
# (dpkg --add-architecture) and apt has its index: that changes the machine,
# needs root, and is said before it is done. Once that is done (by root,
# once), anyone may fetch: `apt-get download` writes only into DEST.
set -eu

DEST="${1:-.cache/foreign}"
ARCHS="${FOREIGN_ARCHS:-arm64 armhf armel ppc64el s390x mips64el i386}"
# And, for the loader tests, a dynamically linked arm64 program (Debian's
# busybox) and the arm64 C library it needs, unpacked in a tree of its own.
EXTRAS="${FOREIGN_EXTRAS-arm64}"

todo=""
for a in $ARCHS; do [ -x "$DEST/$a/busybox" ] || todo="$todo $a"; done
extras=""
for a in $EXTRAS; do
    [ -x "$DEST/$a/busybox-dynamic" ] && [ -d "$DEST/$a/libc6" ] || extras="$extras $a"
done
[ -z "$todo$extras" ] && exit 0

known=" $(dpkg --print-architecture) $(dpkg --print-foreign-architectures | tr '\n' ' ') "
unknown=""
for a in $todo $extras; do
    case "$known" in *" $a "*) ;; *) unknown="$unknown $a" ;; esac
done

# apt has an index of busybox-static for arch a (apt-get update was run since
# the architecture was added).
indexed() { apt-cache show "$1" >/dev/null 2>&1; }
unindexed=""
for a in $todo; do
    case " $unknown " in *" $a "*) ;; *) indexed "busybox-static:$a" || unindexed="$unindexed $a" ;; esac
done
for a in $extras; do
    case " $unknown " in *" $a "*) ;; *) indexed "libc6:$a" || unindexed="$unindexed $a" ;; esac
done

if [ -n "$unknown$unindexed" ]; then
    if [ "$(id -u)" != 0 ]; then
        [ -n "$unknown" ] && echo "fetch: dpkg does not know the architectures:$unknown" >&2
        [ -n "$unindexed" ] && echo "fetch: apt has no index of busybox-static for:$unindexed" >&2
        cmd=""
        for a in $unknown; do cmd="${cmd}dpkg --add-architecture $a; "; done
        echo "fetch: that takes root, once for the machine: sudo sh -c '${cmd}apt-get update'" >&2
        echo "fetch: (then make again), or put the binaries at $DEST/<arch>/busybox" >&2
        exit 1
    fi
    if [ -n "$unknown" ]; then
        echo "fetch: this changes the machine: adding the dpkg foreign architectures$unknown"
        echo "fetch: (dpkg --add-architecture; apt can then download their packages, nothing"
        echo "fetch: of them is installed; undo: dpkg --remove-architecture ARCH), then apt-get update"
        for a in $unknown; do dpkg --add-architecture "$a"; done
    else
        echo "fetch: apt-get update: apt has no index of busybox-static for:$unindexed"
    fi
    apt-get update -qq >/dev/null 2>&1 || echo "fetch: apt-get update reported errors" >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt's sandbox user must be able to write here

download() {
    (cd "$work" && apt-get download -qq "$1") 2>"$work/err"
}
# A mirror in mid-sync can fail one index; update (again, as root) and retry.
fetch() {
    tries=0
    until download "$1"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 3 ]; then
            cat "$work/err" >&2
            echo "fetch: could not download $1" >&2
            exit 1
        fi
        if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
        sleep "$tries"
    done
}
for a in $extras; do
    fetch "busybox:$a"
    fetch "libc6:$a"
    rm -rf "$DEST/$a/libc6" "$work/x-$a"
    mkdir -p "$DEST/$a"
    dpkg-deb -x "$(ls "$work"/busybox_*_"$a".deb)" "$work/x-$a"
    cp "$work/x-$a/bin/busybox" "$DEST/$a/busybox-dynamic.tmp"
    chmod 755 "$DEST/$a/busybox-dynamic.tmp"
    dpkg-deb -x "$(ls "$work"/libc6_*_"$a".deb)" "$DEST/$a/libc6.tmp"
    mv "$DEST/$a/libc6.tmp" "$DEST/$a/libc6"
    mv "$DEST/$a/busybox-dynamic.tmp" "$DEST/$a/busybox-dynamic"
    rm -rf "$work"/busybox_*_"$a".deb "$work"/libc6_*_"$a".deb "$work/x-$a"
    echo "fetch: $DEST/$a/busybox-dynamic, $DEST/$a/libc6"
done
for a in $todo; do
    fetch "busybox-static:$a"
    deb="$(ls "$work"/busybox-static_*_"$a".deb)"
    dpkg-deb -x "$deb" "$work/x-$a"
    mkdir -p "$DEST/$a"
    cp "$work/x-$a/bin/busybox" "$DEST/$a/busybox.tmp"
    chmod 755 "$DEST/$a/busybox.tmp"
    mv "$DEST/$a/busybox.tmp" "$DEST/$a/busybox"
    rm -f "$deb"
    echo "fetch: $DEST/$a/busybox"
done
