#!/usr/bin/env bash
# demo-disk.sh: ferry's disk service alone, end to end, narrated.
#
#   scripts/setup.sh && scripts/build.sh && scripts/demo-disk.sh
#
# Starts ferryd in a temp dir (API on a free port, NBD on its own unix socket),
# creates a 1 GiB disk, puts a small image into it with qemu-img, writes and
# reads it with qemu-io, looks at it with nbdinfo (allocation map and ferry's
# dirty map), shows what ferryd recorded (dirty map, heat, stats) and stops
# ferryd with SIGTERM.  Everything it starts it stops (by pid), and the temp
# dir goes away, also on failure or Ctrl-C.
#
# Environment: FERRY_BUILD (default build; built if absent), KEEP=1 keeps the
# temp dir for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${FERRY_BUILD:-build}
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
PY=/usr/bin/python3

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step_no=0
step() { step_no=$((step_no + 1)); echo; bold "== $step_no. $*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

for tool in qemu-img qemu-io nbdinfo; do
  command -v "$tool" >/dev/null || { echo "demo: $tool missing; run scripts/setup.sh" >&2; exit 1; }
done
if [ ! -x "$BUILD/ferryd" ] || [ ! -x "$BUILD/ferry" ]; then
  echo "demo: no binaries in $BUILD; building the release flavour first"
  scripts/build.sh release "$BUILD"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
DATA="$TMP/data"
SOCK="$TMP/nbd.sock"
LOG="$TMP/ferryd.log"
FERRYD_PID=

cleanup() {
  rc=$?
  if [ -n "$FERRYD_PID" ] && kill -0 "$FERRYD_PID" 2>/dev/null; then
    kill -TERM "$FERRYD_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$FERRYD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$FERRYD_PID" 2>/dev/null || true
    wait "$FERRYD_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$LOG" ]; then
    echo "demo: FAILED (exit $rc); last lines of ferryd's log:" >&2
    tail -n 30 "$LOG" >&2
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "demo: kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Start ferryd: data in $DATA, REST API on a free port, NBD on $SOCK"
FERRYD_ARGS=(--data-dir "$DATA" --api 127.0.0.1:0 --nbd "unix:$SOCK" --log-level info)
printf '$ %s %s >%s 2>&1 &\n' "$BUILD/ferryd" "${FERRYD_ARGS[*]}" "$LOG"
"$BUILD/ferryd" "${FERRYD_ARGS[@]}" >"$LOG" 2>&1 &
FERRYD_PID=$!   # ferryd itself (no subshell in between), so SIGTERM reaches it
echo "ferryd pid $FERRYD_PID; waiting for $DATA/ferryd.json"
for _ in $(seq 300); do
  if [ -f "$DATA/ferryd.json" ] &&
     [ "$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$DATA/ferryd.json" 2>/dev/null)" = "$FERRYD_PID" ]; then
    break
  fi
  kill -0 "$FERRYD_PID" 2>/dev/null || { echo "ferryd exited early" >&2; exit 1; }
  sleep 0.1
done
[ -f "$DATA/ferryd.json" ] || { echo "ferryd not ready after 30 s" >&2; exit 1; }
echo "ready"
show cat "$DATA/ferryd.json"; echo
API=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$DATA/ferryd.json")
ferry() { printf '$ ferry %s\n' "$*"; "$BUILD/ferry" --api "$API" "$@"; }

step "Create a 1 GiB disk (a sparse raw image in the data dir)"
ferry disk create demo --size 1G
URI="nbd+unix:///demo?socket=$SOCK"
echo "NBD URI: $URI   (the export name is the disk name)"

step "Put a small image into it with qemu-img convert, then compare"
$PY - "$TMP/small.raw" <<'EOF'
import os, sys
data = bytearray(os.urandom(8 << 20))
data[2 << 20:4 << 20] = bytes(2 << 20)     # a zero stretch: sent as WRITE_ZEROES
open(sys.argv[1], "wb").write(data)
EOF
show qemu-img convert -n -p -f raw -O raw "$TMP/small.raw" "$URI"
show qemu-img compare -f raw -F raw "$TMP/small.raw" "$URI"
echo "(the disk is larger than the image: compare checks that the rest reads as zeros)"

step "Write patterns at a few offsets with qemu-io (unaligned too), read them back verified"
show qemu-io -f raw -c 'write -P 0xab 100M 64k' -c 'write -P 0xcd 300000123 3333' \
  -c 'write -P 0xef 768M 1M' "$URI"
show qemu-io -f raw -c 'read -P 0xab 100M 64k' -c 'read -P 0xcd 300000123 3333' \
  -c 'read -P 0xef 768M 1M' -c 'read -P 0 900M 4k' "$URI"

step "Ask the server what is allocated (NBD base:allocation)"
show nbdinfo --map "$URI"

step "Ask the server what changed (NBD meta context ferry:dirty, bit 0 = written)"
show nbdinfo --map=ferry:dirty "$URI"

step "What ferryd recorded: size, allocation, dirty map, IO stats, latency, heat"
ferry disk show demo

step "The dirty map as extents (64 KiB granularity) and the hottest regions"
ferry disk dirty demo
ferry disk heat demo --top 5

step "Take the dirty map (as a replicator would) and start a clean one"
ferry disk dirty demo --swap
ferry disk dirty demo

step "Stop ferryd with SIGTERM: it finishes requests, syncs disks and maps, exits 0"
kill -TERM "$FERRYD_PID"
rc=0
wait "$FERRYD_PID" || rc=$?
FERRYD_PID=
echo "ferryd exited with $rc"
[ "$rc" -eq 0 ] || exit 1
[ ! -e "$DATA/ferryd.json" ] && echo "ferryd.json removed"
echo "last lines of ferryd's log:"
tail -n 5 "$LOG"
echo
bold "Demo done."
