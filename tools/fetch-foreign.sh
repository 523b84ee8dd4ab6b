#!/bin/sh
# Fetch Debian's busybox-static for the foreign architectures the tests run,
# into DEST/<debian-arch>/busybox. Idempotent: present files are kept.
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

if [ "$(id -u)" != 0 ]; then
    echo "fetch: need root to add the dpkg architectures for:$todo" >&2
    echo "fetch: run make as root once, or put the binaries at $DEST/<arch>/busybox" >&2
    exit 1
fi

known="$(dpkg --print-architecture) $(dpkg --print-foreign-architectures | tr '\n' ' ')"
added=0
for a in $todo $extras; do
    case " $known " in *" $a "*) ;; *) dpkg --add-architecture "$a"; added=1 ;; esac
done

if [ "$added" = 1 ]; then
    apt-get update -qq >/dev/null 2>&1 || echo "fetch: apt-get update reported errors" >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt's sandbox user must be able to write here

download() {
    (cd "$work" && apt-get download -qq "$1") 2>"$work/err"
}
# A mirror in mid-sync can fail one index; update (again) and retry.
fetch() {
    tries=0
    until download "$1"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 3 ]; then
            cat "$work/err" >&2
            echo "fetch: could not download $1" >&2
            exit 1
        fi
        apt-get update -qq >/dev/null 2>&1 || true
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
    rm -f "$work"/busybox_*_"$a".deb "$work"/libc6_*_"$a".deb
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
