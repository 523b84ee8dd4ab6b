#!/bin/sh
# `make run`: the daemon in a sandbox (its own binfmt_misc instance), with its
# socket and state under ./run. Nothing outside the sandbox changes.
set -eu
root="$(pwd)"
run="${RUN_DIR:-$root/run}"
sock="$run/qusd.sock"
bin="$root/.venv/bin"
mkdir -p "$run"
cat <<MSG
qusd starts in a sandbox: its own binfmt_misc table, nothing outside changes.
Socket: $sock   State: $run/state

In a second terminal:

  curl --unix-socket $sock http://localhost/v1/registrations
  curl --unix-socket $sock -H 'Content-Type: application/json' \\
       -d '{"targets": ["aarch64"]}' http://localhost/v1/registrations
  $bin/qusctl --socket $sock list
  $bin/qusctl --socket $sock run -- $root/.cache/foreign/arm64/busybox uname -m

Ctrl-C stops it; the registrations come back at the next 'make run'.

MSG
# The socket is yours (and in the sandbox, nobody else's table): a group
# for it only when the machine has one.
getent group qusd >/dev/null 2>&1 || export QUSD_SOCKET_GROUP=
exec "$bin/qusd" --sandbox --socket "$sock" --state-dir "$run/state" \
    --config "$root/packaging/qusd.toml"
