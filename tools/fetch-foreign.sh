#!/bin/sh
# Fetch Debian's busybox-static for the foreign architectures the tests run,
# into DEST/<debian-arch>/busybox. Idempotent: present files are kept.
set -eu

DEST="${1:-.cache/foreign}"
ARCHS="${FOREIGN_ARCHS:-arm64 armhf armel ppc64el s390x mips64el i386}"

todo=""
for a in $ARCHS; do [ -x "$DEST/$a/busybox" ] || todo="$todo $a"; done
[ -z "$todo" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "fetch: need root to add the dpkg architectures for:$todo" >&2
    echo "fetch: run make as root once, or put the binaries at $DEST/<arch>/busybox" >&2
    exit 1
fi

known="$(dpkg --print-architecture) $(dpkg --print-foreign-architectures | tr '\n' ' ')"
added=0
for a in $todo; do
    case " $known " in *" $a "*) ;; *) dpkg --add-architecture "$a"; added=1 ;; esac
done

if [ "$added" = 1 ]; then
    apt-get update -qq >/dev/null 2>&1 || echo "fetch: apt-get update reported errors" >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt's sandbox user must be able to write here

download() {
    (cd "$work" && apt-get download -qq "busybox-static:$1") 2>"$work/err"
}
for a in $todo; do
    # A mirror in mid-sync can fail one index; update (again) and retry.
    tries=0
    until download "$a"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 3 ]; then
            cat "$work/err" >&2
            echo "fetch: could not download busybox-static:$a" >&2
            exit 1
        fi
        apt-get update -qq >/dev/null 2>&1 || true
        sleep "$tries"
    done
    deb="$(ls "$work"/busybox-static_*_"$a".deb)"
    dpkg-deb -x "$deb" "$work/x-$a"
    mkdir -p "$DEST/$a"
    cp "$work/x-$a/bin/busybox" "$DEST/$a/busybox.tmp"
    chmod 755 "$DEST/$a/busybox.tmp"
    mv "$DEST/$a/busybox.tmp" "$DEST/$a/busybox"
    rm -f "$deb"
    echo "fetch: $DEST/$a/busybox"
done
