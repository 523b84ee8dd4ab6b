#!/bin/sh
# The Debian 12 system `make test-vm` boots: debootstrap from this machine's
# apt mirror, with a kernel, systemd, and what qusd's package depends on
# (qemu-user-static, python3), so that `apt-get install ./qusd_*.deb` works
# inside it offline, as on any Debian host. Plus curl for the API checks and
# the unit that runs the checks at boot (tools/vm/check.sh, from a second
# disk).
#
#   sh tools/vm/image.sh     prints the directory with root.img (raw ext4),
#                            vmlinuz and initrd.img, built once per version
#                            of this file (the cache key is its hash)
#
# Cache: $QUSD_VM_CACHE, else /var/cache/qusd-test/vm (root) or
# $XDG_CACHE_HOME/qusd-test/vm. Needs root (debootstrap, chroot).
set -eu
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ]; then default=/var/cache/qusd-test/vm
else default=${XDG_CACHE_HOME:-$HOME/.cache}/qusd-test/vm; fi
cache=${QUSD_VM_CACHE:-$default}
key=$(sha256sum image.sh | cut -c1-16)
out=$cache/bookworm-$key

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9                                   # one builder at a time
if [ -f "$out/root.img" ]; then
    touch "$out"                          # used: kept by the pruning below
    echo "$out"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "image: building $out needs root (debootstrap)" >&2; exit 1; }

# The mirror this machine's apt uses for bookworm (QUSD_VM_MIRROR overrides).
# shellcheck disable=SC2016 # $(REPO_URI) is apt's, not the shell's
mirror=${QUSD_VM_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' \
    'Codename: bookworm' 'Identifier: Packages' | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian/}
echo "image: building $out from $mirror (a few minutes, once)" >&2

tmp=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
debootstrap --variant=minbase \
    --include=systemd-sysv,udev,dbus,linux-image-amd64,qemu-user-static,python3,curl \
    bookworm "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
    { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }

echo qusd-vm >"$root/etc/hostname"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
# No network, nobody to log in but whoever debugs on the serial console.
chroot "$root" passwd -dq root
# The checks: a oneshot after qusd, before logins are allowed, reading its
# script from the second disk (a tar archive; /run is noexec) and reporting
# on ttyS1.
cat >"$root/etc/systemd/system/qusd-vmtest.service" <<'EOF'
[Unit]
Description=qusd VM checks (tools/vm/check.sh)
Requires=dev-vdb.device
After=dev-vdb.device qusd.service
Before=systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /run/vmtest && tar -xf /dev/vdb -C /run/vmtest && exec bash /run/vmtest/check.sh'
StandardOutput=file:/dev/ttyS1
StandardError=inherit
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable -q qusd-vmtest.service
# Offline: no timer may take dpkg's lock while the checks install, and the
# package lists would only be stale (and cost apt 20 s to parse under TCG;
# what qusd depends on is installed, which is all apt needs).
chroot "$root" systemctl disable -q apt-daily.timer apt-daily-upgrade.timer
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*

cp "$root"/boot/vmlinuz-* "$tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$tmp/initrd.img"
mkfs.ext4 -q -L root -d "$root" "$tmp/root.img" 4G >&2
rm -rf "$root" "$tmp/debootstrap.log"
chmod 755 "$tmp"
mv "$tmp" "$out"
trap - EXIT
# Images of other versions of this file, unused for a week, go.
find "$cache" -mindepth 1 -maxdepth 1 -name 'bookworm-*' ! -path "$out" -mtime +7 \
    -exec rm -rf {} +
echo "$out"
