#!/usr/bin/env bash
# memory_bench.sh: how much memory ferryd needs for big disks under load.
# Not part of the test suite.
#
#   bench/memory_bench.sh [RUNTIME_S=30]
#
# Starts ferryd (release build, $FERRY_BUILD or build/) in a temp dir, creates
# 8 sparse 1 TiB disks, runs fio (nbd engine) on all 8 at once: 4 KiB random
# writes spread over the whole 1 TiB of each disk (iodepth 8, capped at
# RATE_IOPS per disk, default 1000, so the sparse images stay small: about
# 8 * RATE_IOPS * RUNTIME * 4 KiB of real disk space).  Samples VmRSS of
# ferryd every second and reports VmRSS before/during/after and VmHWM (peak).
# Everything it starts is stopped by pid; the temp dir is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNTIME=${1:-${RUNTIME:-30}}
RATE_IOPS=${RATE_IOPS:-1000}
NDISKS=${NDISKS:-8}
DISK_SIZE=${DISK_SIZE:-1T}
BUILD=${FERRY_BUILD:-build}
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
PY=/usr/bin/python3

[ -x "$BUILD/ferryd" ] || { echo "memory_bench: no $BUILD/ferryd (scripts/build.sh release)" >&2; exit 1; }
command -v fio >/dev/null || { echo "memory_bench: fio missing (scripts/setup.sh)" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ferry-membench.XXXXXX")
FERRYD_PID=
FIO_PIDS=()
cleanup() {
  for p in "${FIO_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${FIO_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$FERRYD_PID" ]; then
    kill -TERM "$FERRYD_PID" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$FERRYD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$FERRYD_PID" 2>/dev/null || true
    wait "$FERRYD_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mem() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }   # kB

"$BUILD/ferryd" --data-dir "$TMP/data" --api 127.0.0.1:0 --nbd "unix:$TMP/nbd.sock" \
  --log-level warn >"$TMP/ferryd.log" 2>&1 &
FERRYD_PID=$!
for _ in $(seq 300); do
  [ -f "$TMP/data/ferryd.json" ] && break
  kill -0 "$FERRYD_PID" || { cat "$TMP/ferryd.log" >&2; exit 1; }
  sleep 0.1
done
API=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$TMP/data/ferryd.json")
rss_start=$(mem "$FERRYD_PID" VmRSS)

for i in $(seq 0 $((NDISKS - 1))); do
  "$BUILD/ferry" --api "$API" disk create "m$i" --size "$DISK_SIZE" >/dev/null
done
rss_disks=$(mem "$FERRYD_PID" VmRSS)

echo "# fio: $NDISKS x $DISK_SIZE disks, 4k randwrite over the whole disk, ${RUNTIME}s, <= $RATE_IOPS IOPS each" >&2
for i in $(seq 0 $((NDISKS - 1))); do
  fio --name="m$i" --ioengine=nbd --uri="nbd+unix:///m$i?socket=$TMP/nbd.sock" \
      --rw=randwrite --bs=4k --iodepth=8 --size="$DISK_SIZE" --norandommap --randrepeat=0 \
      --time_based --runtime="$RUNTIME" --rate_iops="$RATE_IOPS" --output-format=json \
      >"$TMP/fio-$i.json" 2>"$TMP/fio-$i.err" &
  FIO_PIDS+=($!)
done

peak_sample=0
samples=0
sum=0
for _ in $(seq "$RUNTIME"); do
  sleep 1
  r=$(mem "$FERRYD_PID" VmRSS)
  samples=$((samples + 1)); sum=$((sum + r))
  [ "$r" -gt "$peak_sample" ] && peak_sample=$r
done
fail=0
for p in "${FIO_PIDS[@]}"; do wait "$p" || fail=1; done
FIO_PIDS=()
[ "$fail" = 0 ] || { echo "memory_bench: a fio job failed:" >&2; cat "$TMP"/fio-*.err >&2; exit 1; }

ops=$($PY - "$TMP" "$NDISKS" <<'EOF'
import json, sys
tot = 0
for i in range(int(sys.argv[2])):
    s = open(f"{sys.argv[1]}/fio-{i}.json").read()
    tot += json.loads(s[s.index("{"):])["jobs"][0]["write"]["total_ios"]
print(tot)
EOF
)
rss_end=$(mem "$FERRYD_PID" VmRSS)
hwm=$(mem "$FERRYD_PID" VmHWM)
threads=$(mem "$FERRYD_PID" Threads)
alloc=$(du -sk "$TMP/data" | cut -f1)

cat <<EOF

ferryd memory, $NDISKS disks of $DISK_SIZE, ${RUNTIME}s of 4 KiB random writes on all at once

| measure | value |
|---|---|
| VmRSS at start (no disks) | $((rss_start / 1024)) MiB |
| VmRSS with $NDISKS disks open | $((rss_disks / 1024)) MiB |
| VmRSS under load, mean / max of samples | $((sum / (samples > 0 ? samples : 1) / 1024)) / $((peak_sample / 1024)) MiB |
| VmRSS after load | $((rss_end / 1024)) MiB |
| VmHWM (peak RSS) | $((hwm / 1024)) MiB |
| threads | $threads |
| writes done (all disks) | $ops |
| data dir on disk | $((alloc / 1024)) MiB |
EOF
