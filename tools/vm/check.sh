#!/bin/bash
# What `make test-vm` checks inside the Debian 12 VM (tools/vm/image.sh):
# the promises of README's "Running under systemd" and "Living with the
# distribution's binfmt.d rules", lived as an admin and users live them.
# Run at each boot by qusd-vmtest.service (after qusd, before logins); the
# boot (boot1, boot2) comes from the kernel command line (qusd_vmtest=).
#
# Reported on ttyS1, for tests/test_vm.py:
#   qusd-vm: begin BOOT/STEP
#   ...the commands of the step and what they printed...
#   qusd-vm: end BOOT/STEP ok|FAIL [key=value ...]
#   qusd-vm: done BOOT
set -u
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"  # the payload: the package, busybox for arm64 and s390x
boot=$(sed -n 's/.*qusd_vmtest=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
BINFMT=/proc/sys/fs/binfmt_misc
REC=/var/lib/qusd-vmtest/recorded          # qusd's entries as boot 1 left them
SOCK=/run/qusd/qusd.sock
RESTORED_ID=6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d01  # README: MESSAGE_ID of "restored"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

# --- helpers (inside a step: set -e, output goes to the report) ---
fail() { echo "FAIL: $*"; exit 1; }
note() { echo "$*" >>"$here/detail"; }   # key=value for the step's end line
run() { echo "# $*" >&2; "$@"; }
as() { local user=$1; shift; echo "# ($user) $*" >&2; runuser -u "$user" -- "$@"; }
want() { [ "$1" = "$2" ] || fail "got '$1', expected '$2'"; }
want_exit() {  # want_exit STATUS CMD...: CMD fails with STATUS
    local rc=0 want=$1; shift
    "$@" || rc=$?
    echo "-> exit $rc" >&2
    [ "$rc" = "$want" ] || fail "exit status $rc, expected $want"
}
now() { echo "${EPOCHREALTIME/./}"; }  # microseconds
span() {  # seconds from one now() to another, as 1.23
    local d=$(($2 - $1))
    printf '%d.%02d\n' $((d / 1000000)) $((d % 1000000 / 10000))
}
since() { span "$1" "$(now)"; }
le() { python3 -c 'import sys; sys.exit(not float(sys.argv[1]) <= float(sys.argv[2]))' "$1" "$2"; }
until_true() {  # until_true SECONDS CMD...: poll CMD every 50 ms
    local end=$((EPOCHSECONDS + $1)); shift
    until "$@"; do [ "$EPOCHSECONDS" -lt "$end" ] || return 1; sleep 0.05; done
}
# Every entry boot 1 recorded is in the kernel, byte for byte.
# cmp reads /proc's files through a pipe: their st_size is 0.
# shellcheck disable=SC2002
same() { cat "$BINFMT/${1##*/}" 2>/dev/null | cmp -s "$1" -; }
as_recorded() {
    local f
    for f in "$REC"/*; do same "$f" || return 1; done
}
show_recorded_diff() {
    local f
    for f in "$REC"/*; do
        same "$f" && continue
        echo "${f##*/}: recorded:"; cat "$f"
        echo "${f##*/}: in the kernel:"; cat "$BINFMT/${f##*/}" 2>&1 || true
    done
}
main_pid() { systemctl show -P MainPID qusd.service; }
active() { [ "$(systemctl is-active qusd.service)" = active ]; }
restarted() {  # restarted OLDPID: another qusd runs
    local pid; pid=$(main_pid)
    [ "$pid" != "$1" ] && [ "$pid" != 0 ] && active
}
# The reconcile interval qusd runs with: /etc/qusd/qusd.toml, or the default
# the file documents in its commented-out line.
reconcile_interval() {
    python3 - <<'EOF'
import re, tomllib
text = open("/etc/qusd/qusd.toml").read()
value = tomllib.loads(text).get("qusd", {}).get("reconcile_interval")
if value is None:
    value = re.search(r"^#\s*reconcile_interval\s*=\s*(\S+)", text, re.M).group(1)
print(float(value))
EOF
}

step() {  # step NAME FUNCTION: run it in a subshell, report its result
    local name=$1 rc t0; shift
    : >"$here/detail"
    t0=$(now)
    echo "qusd-vm: begin $boot/$name"
    # Not in a || list, which would turn set -e off; through a pipe, so that
    # no progress meter sees a terminal.
    ( set -eu; "$@" ) 2>&1 | cat
    rc=${PIPESTATUS[0]}
    local result=ok
    if [ "$rc" != 0 ]; then
        result=FAIL
        echo "--- qusd when $name failed:"
        systemctl status --no-pager qusd.service qusd.socket 2>&1
        journalctl -b -u qusd.service -n 30 --no-pager 2>&1
    fi
    note "step_s=$(since "$t0")"
    echo "qusd-vm: end $boot/$name $result $(tr '\n' ' ' <"$here/detail" | sed 's/ $//')"
}

# --- first boot: install, then users and admins at work ---

check_install() {
    # As on any Debian host; everything it depends on is already there.
    run apt-get install -y -q ./qusd_*.deb
    run dpkg-query -W qusd
}

check_units() {
    want "$(systemctl is-enabled qusd.service qusd.socket | xargs)" "enabled enabled"
    want "$(systemctl is-active qusd.service qusd.socket | xargs)" "active active"
    run systemctl status --no-pager qusd.service qusd.socket
}

check_socket() {
    run ls -l "$SOCK"
    want "$(stat -c '%F %U:%G %a' "$SOCK")" "socket root:qusd 660"
}

check_accounts() {
    # alice may ask for emulation, bob is nobody to qusd, carol is an admin.
    run useradd -m -G qusd alice
    run useradd -m bob
    run useradd -m -G qusd,qusd-admin carol
    run install -m 755 busybox-arm64 busybox-s390x /usr/local/bin/
    run id alice; run id bob; run id carol
}

check_user_debian_rule() {
    # README: on a stock Debian, Debian's qemu-aarch64 is there: exit 73.
    run cat "$BINFMT/qemu-aarch64"
    want_exit 73 as alice qusctl register arm64
    want "$(as alice /usr/local/bin/busybox-arm64 uname -m)" aarch64  # Debian's rule runs it
}

check_user_free_target() {
    # README: mask Debian's rule, and users in qusd can register the target.
    run ln -s /dev/null /etc/binfmt.d/qemu-aarch64.conf
    run systemctl restart systemd-binfmt
    [ ! -e "$BINFMT/qemu-aarch64" ] || fail "qemu-aarch64 is still registered"
    as alice qusctl register arm64
    run cat "$BINFMT/qemu-aarch64"
    grep -qx 'interpreter /usr/bin/qemu-aarch64-static' "$BINFMT/qemu-aarch64"
    grep -qx 'flags: F' "$BINFMT/qemu-aarch64"
    want "$(as alice /usr/local/bin/busybox-arm64 uname -m)" aarch64
    as alice qusctl list
}

check_user_refused() {
    # Replacing an entry qusd did not make is for admins only.
    local before answer
    before=$(cat "$BINFMT/qemu-s390x")
    answer=$(as alice curl -sS -w '\n%{http_code}' --unix-socket "$SOCK" \
        -H 'Content-Type: application/json' -d '{"targets": ["s390x"], "replace": true}' \
        http://localhost/v1/registrations)
    echo "$answer"
    want "${answer##*$'\n'}" 403
    want_exit 77 as alice qusctl register --replace s390x
    want "$(cat "$BINFMT/qemu-s390x")" "$before"
}

check_outsider_refused() {
    # Not in qusd: the socket (root:qusd 0660) does not even let bob connect.
    want_exit 77 as bob qusctl list
    want_exit 77 as bob qusctl register s390x
    want_exit 7 as bob curl -sS --unix-socket "$SOCK" http://localhost/v1/health
}

check_admin_replace() {
    # README: an admin takes Debian's name over with --replace.
    run cat "$BINFMT/qemu-s390x"
    as carol qusctl register --replace s390x
    run cat "$BINFMT/qemu-s390x"
    grep -qx 'interpreter /usr/bin/qemu-s390x-static' "$BINFMT/qemu-s390x"
    grep -qx 'flags: F' "$BINFMT/qemu-s390x"
    want "$(as alice /usr/local/bin/busybox-s390x uname -m)" s390x
}

check_record() {
    # What qusd keeps (persistent), as the kernel shows it now.
    local names n
    names=$(qusctl list --json | python3 -c \
        'import json, sys; print(*sorted(r["name"] for r in json.load(sys.stdin) if r["persistent"]))')
    want "$names" "qemu-aarch64 qemu-s390x"
    mkdir -p "$REC"
    for n in $names; do cat "$BINFMT/$n" >"$REC/$n"; echo "== $n"; cat "$REC/$n"; done
    sync
}

# --- second boot: the promises of the boot path ---

check_restored() {
    # First thing after qusd's READY=1, before systemd-user-sessions lets
    # anyone log in: the table as boot 1 left it.
    local sessions
    sessions=$(systemctl is-active systemd-user-sessions.service || true)
    as_recorded || { show_recorded_diff; fail "not restored as recorded"; }
    echo "systemd-user-sessions.service: $sessions"
    want "$sessions" inactive
    want "$(systemctl is-enabled qusd.service qusd.socket | xargs)" "enabled enabled"
    want "$(systemctl is-active qusd.service qusd.socket | xargs)" "active active"
    run systemctl status --no-pager qusd.service
}

check_journal() {
    # alice's qemu-aarch64 waits for qusd, which restores it; carol's
    # qemu-s390x (an admin's) was registered before, by systemd-binfmt from
    # the file qusd keeps (README: "The boot hand-off"), and qusd adopts it.
    local out
    out=$(journalctl -b -u qusd.service -o cat "MESSAGE_ID=$RESTORED_ID")
    echo "$out"
    grep -q 'qemu-aarch64' <<<"$out" || fail "no restored event for qemu-aarch64"
    journalctl -b -u qusd.service -o cat | grep -F 'restore: restored 1, adopted 1' ||
        fail "qusd did not adopt qemu-s390x"
    want "$(systemctl is-active systemd-binfmt.service)" active
}

check_chroot_f() {
    # F: the kernel holds the interpreter open; the chroot has none.
    local dir
    dir=$(mktemp -d)
    cp /usr/local/bin/busybox-arm64 "$dir/busybox"
    run ls -lR "$dir"
    want "$(run chroot "$dir" /busybox uname -m)" aarch64
}

check_binfmt_restart() {
    # systemd-binfmt flushes the whole table when it stops and again when it
    # starts, then registers Debian's rules; qusd registers its own again at
    # its next check. So they are back within reconcile_interval (+1 s to do
    # it) of the restart's end, the last flush; counted from the restart's
    # beginning, add the restart's own time.
    local interval bound t0 t1 t2 back i figures="" totals=""
    interval=$(reconcile_interval)
    bound=$(python3 -c "print($interval + 1)")
    for i in 1 2 3; do
        t0=$(now)
        run systemctl restart systemd-binfmt
        t1=$(now)
        until_true 60 as_recorded || { show_recorded_diff; fail "not back after 60 s"; }
        t2=$(now)
        back=$(span "$t1" "$t2")
        echo "round $i: restart took $(span "$t0" "$t1") s; entries back ${back} s after it" \
            "returned, $(span "$t0" "$t2") s after it began"
        journalctl -u qusd.service -o cat --since "@$((t0 / 1000000))" "MESSAGE_ID=$RESTORED_ID" |
            grep -q qemu-aarch64 || fail "qusd did not log registering qemu-aarch64 again"
        le "$back" "$bound" || fail "back ${back} s after the restart, over reconcile_interval + 1 = ${bound} s"
        figures="$figures${figures:+,}$back"
        totals="$totals${totals:+,}$(span "$t0" "$t2")"
        sleep 1
    done
    note "back_after_s=$figures from_restart_start_s=$totals reconcile_interval_s=$interval bound_s=$bound"
}

check_sigkill() {
    local pid restarts t0
    pid=$(main_pid)
    restarts=$(systemctl show -P NRestarts qusd.service)
    t0=$(now)
    run kill -KILL "$pid"
    until_true 60 restarted "$pid" ||
        fail "not restarted after 60 s"
    note "restarted_after_s=$(since "$t0")"
    want "$(systemctl show -P NRestarts qusd.service)" "$((restarts + 1))"
    as_recorded || { show_recorded_diff; fail "entries changed"; }
    as alice qusctl list
}

check_watchdog() {
    # A stopped (wedged) daemon sends no WATCHDOG=1: systemd kills and
    # restarts it after WatchdogSec.
    local pid t0 limit
    limit=$(systemctl show -P WatchdogUSec qusd.service)
    pid=$(main_pid)
    t0=$(now)
    run kill -STOP "$pid"
    until_true 180 restarted "$pid" ||
        fail "not restarted 180 s after SIGSTOP"
    note "restarted_after_s=$(since "$t0") watchdog=$limit"
    journalctl -u qusd.service -o cat --since "@$((t0 / 1000000))" | grep -i watchdog ||
        fail "no watchdog timeout in the journal"
    as_recorded || { show_recorded_diff; fail "entries changed"; }
    as alice qusctl list
}

check_handoff() {
    # README "The boot hand-off": systemd-binfmt registers what qusd keeps
    # (an admin's entries) from qusd's file, with qusd stopped: as at boot.
    local t0
    run ls -l /usr/lib/binfmt.d/qusd.conf
    run cat /var/lib/qusd/binfmt.conf
    grep -q '^:qemu-s390x:' /var/lib/qusd/binfmt.conf || fail "qemu-s390x is not in the file"
    if grep -q '^:qemu-aarch64:' /var/lib/qusd/binfmt.conf; then fail "a user's entry is in it"; fi
    run systemctl stop qusd.socket qusd.service
    t0=$(now)
    run systemctl restart systemd-binfmt
    note "restart_s=$(since "$t0")"
    same "$REC/qemu-s390x" || { show_recorded_diff; fail "systemd-binfmt did not register qemu-s390x"; }
    [ ! -e "$BINFMT/qemu-aarch64" ] || fail "qemu-aarch64 is there without qusd"
    want "$(as alice /usr/local/bin/busybox-s390x uname -m)" s390x
    run systemctl start qusd.socket qusd.service
    until_true 60 as_recorded || { show_recorded_diff; fail "qusd did not restore the rest"; }
}

check_stop_keeps() {
    run systemctl stop qusd.service
    want "$(systemctl is-active qusd.service || true)" inactive
    as_recorded || { show_recorded_diff; fail "stopping qusd changed the table"; }
    journalctl -u qusd.service -o cat -n 5
}

check_security() {
    local out score
    out=$(systemd-analyze security --no-pager qusd.service)
    echo "$out"
    score=$(sed -n 's/.*Overall exposure level for qusd\.service: \([0-9.]*\).*/\1/p' <<<"$out")
    [ -n "$score" ] || fail "no overall exposure level"
    note "exposure=$score"
    le "$score" 2.5 || fail "exposure $score is over 2.5"
}

case $boot in
boot1)
    step install check_install
    step units check_units
    step socket check_socket
    step accounts check_accounts
    step user-debian-rule check_user_debian_rule
    step user-free-target check_user_free_target
    step user-refused check_user_refused
    step outsider-refused check_outsider_refused
    step admin-replace check_admin_replace
    step record check_record
    echo "qusd-vm: done boot1"
    systemctl --no-block reboot
    ;;
boot2)
    step restored check_restored
    step journal check_journal
    step chroot-f check_chroot_f
    step binfmt-restart check_binfmt_restart
    step sigkill check_sigkill
    step watchdog check_watchdog
    step handoff check_handoff
    step stop-keeps check_stop_keeps
    step security check_security
    echo "qusd-vm: done boot2"
    systemctl --no-block poweroff
    ;;
*)
    echo "qusd-vm: no qusd_vmtest=boot1|boot2 on the kernel command line" >&2
    ;;
esac
