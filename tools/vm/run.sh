#!/bin/sh
# Boot the Debian 12 VM twice with qusd's package and collect what
# tools/vm/check.sh reports (tests/test_vm.py reads it; `make test-vm`).
#
#   sh tools/vm/run.sh DEB OUTDIR
#
# OUTDIR gets disk.qcow2 (a copy-on-write overlay of the cached image, kept
# for a look after a failure), payload.tar (the second disk: check.sh, the
# .deb, busybox for arm64 and s390x), and per boot console-BOOT.log (ttyS0:
# kernel, systemd) and report-BOOT.log (ttyS1: the checks). Every boot runs
# under `timeout` ($QUSD_VM_TIMEOUT seconds, default 900). TCG only: no KVM.
# cache=unsafe: the guest's flushes (dpkg fsyncs every file) are not worth
# waiting for on a throw-away disk.
set -eu
deb=$(realpath "$1")
out=$2
here=$(cd "$(dirname "$0")" && pwd)
foreign=${QUSD_FOREIGN_DIR:-$here/../../.cache/foreign}
image=$(sh "$here/image.sh")

rm -rf "$out"
mkdir -p "$out/payload"
cp "$here/check.sh" "$deb" "$out/payload/"
cp "$foreign/arm64/busybox" "$out/payload/busybox-arm64"
cp "$foreign/s390x/busybox" "$out/payload/busybox-s390x"
tar -cf "$out/payload.tar" -C "$out/payload" .
rm -rf "$out/payload"
qemu-img create -q -f qcow2 -F raw -b "$image/root.img" "$out/disk.qcow2"

for boot in boot1 boot2; do
    echo "vm: $boot" >&2
    rc=0
    timeout -k 10 "${QUSD_VM_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -smp 2 -m 1536 \
        -nodefaults -display none -no-reboot \
        -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 qusd_vmtest=$boot" \
        -drive "file=$out/disk.qcow2,format=qcow2,if=virtio,cache=unsafe" \
        -drive "file=$out/payload.tar,format=raw,if=virtio,readonly=on" \
        -device virtio-rng-pci \
        -serial "file:$out/console-$boot.log" -serial "file:$out/report-$boot.log" || rc=$?
    if [ "$rc" != 0 ]; then
        echo "vm: $boot: qemu exited $rc$( [ "$rc" != 124 ] || echo ' (timeout)')" >&2
        exit 1
    fi
done
