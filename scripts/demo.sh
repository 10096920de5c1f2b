#!/usr/bin/env bash
# demo.sh: a live migration between two ferry sites on this machine, narrated.
#
#   scripts/setup.sh && scripts/build.sh && scripts/demo.sh
#
# Starts two ferryd sites, "onprem" and "cloud" (each with its data dir in a
# temp dir, REST API and site link on free loopback ports, NBD on its own unix
# socket), gives each its site identity and pairs them, creates a 1 GiB disk
# at onprem and fills a quarter of it, starts a simulated VM (driver sim) that
# writes to it all the time, and live-migrates the VM to cloud with a progress
# bar.  Then it shows the downtime and the bytes moved, where the VM runs now,
# and the VM's own verify at the destination: every block against the table
# of what the VM wrote, so a lost or misplaced acknowledged write would show.
# Everything it starts it stops (by pid) and the temp dir goes, also on
# failure or Ctrl-C.
#
# With --driver qemu the VM is a real QEMU guest instead (under TCG here):
# the tiny Debian-kernel guest of tests/guest/ (built on first use into
# build-guest/, a few seconds), whose writer appends sequenced records to its
# disk with O_DIRECT; its RAM moves by QEMU's migration through the site
# link, paused before the switch-over while ferry hands the disk over; at
# the end the guest's records on the destination disk are checked: every
# one in order, none missing or misplaced.
#
#   scripts/demo.sh [--driver sim|qemu]
#
# Environment: FERRY_BUILD (default build; built if absent), DISK_SIZE (1G;
# 64M with qemu), FILL (percent, 25; sim only), WORKLOAD (write-heavy; sim
# only), MAX_DOWNTIME (500ms), KEEP=1 keeps the temp dir for a look
# afterwards.  scripts/demo-disk.sh is the earlier demo of the disk service
# alone (qemu-img, qemu-io, nbdinfo).
set -euo pipefail
cd "$(dirname "$0")/.."
DRIVER=sim
while [ $# -gt 0 ]; do
  case "$1" in
    --driver) DRIVER=${2:-}; shift 2 || { echo "demo: --driver needs sim or qemu" >&2; exit 2; } ;;
    --driver=*) DRIVER=${1#--driver=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$DRIVER" in sim|qemu) ;; *) echo "demo: --driver must be sim or qemu, not '$DRIVER'" >&2; exit 2 ;; esac
ROOT=$(pwd)
BUILD=${FERRY_BUILD:-build}
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
PY=/usr/bin/python3
if [ "$DRIVER" = qemu ]; then DISK_SIZE=${DISK_SIZE:-64M}; else DISK_SIZE=${DISK_SIZE:-1G}; fi
FILL=${FILL:-25}
WORKLOAD=${WORKLOAD:-write=80,bs=4k,iops=2000,zipf=0.9,qd=8}
MAX_DOWNTIME=${MAX_DOWNTIME:-500ms}

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step_no=0
step() { step_no=$((step_no + 1)); echo; bold "== $step_no. $*"; }

if [ ! -x "$BUILD/ferryd" ] || [ ! -x "$BUILD/ferry" ] || [ ! -x "$BUILD/ferry-simvm" ]; then
  echo "demo: no binaries in $BUILD; building the release flavour first"
  scripts/build.sh release "$BUILD"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
declare -A PID API
VM_PIDS=()

stop_daemon() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  rc=$?
  # VMs outlive ferryd (as guests do): end the ones this demo started.
  for site in onprem cloud; do
    [ -n "${API[$site]:-}" ] || continue
    for p in $("$BUILD/ferry" --api "${API[$site]}" -o json vm list 2>/dev/null |
               $PY -c 'import json,sys; [print(v["pid"]) for v in json.load(sys.stdin)["vms"] if v["pid"]]' 2>/dev/null); do
      VM_PIDS+=("$p")
    done
  done
  for p in "${VM_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for site in onprem cloud; do stop_daemon "${PID[$site]:-}"; done
  if [ "$rc" -ne 0 ]; then
    for site in onprem cloud; do
      [ -f "$TMP/$site.log" ] || continue
      echo "demo: FAILED (exit $rc); last lines of $site's ferryd log:" >&2
      tail -n 20 "$TMP/$site.log" >&2
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "demo: kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_site() {
  local site=$1 dir="$TMP/$1"
  mkdir -p "$dir"
  local args=(--data-dir "$dir/data" --api 127.0.0.1:0 --link 127.0.0.1:0
              --nbd "unix:$dir/nbd.sock" --log-level info)
  # The tiny guest ignores ACPI power-down: `vm stop` ends it after this.
  [ "$DRIVER" = qemu ] && args+=(--qemu-stop-timeout 3s)
  printf '$ ferryd %s >%s 2>&1 &\n' "${args[*]}" "$TMP/$site.log"
  "$BUILD/ferryd" "${args[@]}" >"$TMP/$site.log" 2>&1 &
  PID[$site]=$!
  for _ in $(seq 300); do
    if [ -f "$dir/data/ferryd.json" ] &&
       [ "$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$dir/data/ferryd.json" 2>/dev/null)" = "${PID[$site]}" ]; then
      break
    fi
    kill -0 "${PID[$site]}" 2>/dev/null || { echo "ferryd ($site) exited early" >&2; exit 1; }
    sleep 0.1
  done
  API[$site]=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$dir/data/ferryd.json")
  echo "$site: ferryd pid ${PID[$site]}, API ${API[$site]}"
}
onprem() { printf '$ ferry --api %s %s\n' "${API[onprem]}" "$*"; "$BUILD/ferry" --api "${API[onprem]}" "$@"; }
cloud() { printf '$ ferry --api %s %s\n' "${API[cloud]}" "$*"; "$BUILD/ferry" --api "${API[cloud]}" "$@"; }

step "Start two sites on this machine: onprem (the source) and cloud (the destination)"
start_site onprem
start_site cloud

step "Give each site its identity on the site link (key + certificate), then pair them"
onprem site init --name onprem
cloud site init --name cloud
onprem site pair "${API[cloud]}"
echo "(each site now trusts exactly the other's certificate: TLS 1.3, mutual authentication)"

if [ "$DRIVER" = qemu ]; then
  step "Build the tiny guest (Debian's kernel + a busybox initramfs with a record writer)"
  tests/guest/build.sh "$ROOT/build-guest"
  GUEST="$ROOT/build-guest"

  step "At onprem: a $DISK_SIZE disk, a network, and a QEMU guest that appends records to its disk"
  onprem disk create vda --size "$DISK_SIZE"
  onprem network add lan --type user
  cloud network add cloud-lan --type user
  onprem hypervisor show qemu
  onprem vm create vm1 --driver qemu --disk vda --memory 256M --nic network=lan \
    --kernel "$GUEST/vmlinux" --initrd "$GUEST/initramfs.cpio.gz" \
    --append "console=ttyS0 panic=-1 ferry.rate=50"
  onprem vm start vm1
  CONSOLE_A="$TMP/onprem/data/vms/vm1/console.log"
  CONSOLE_B="$TMP/cloud/data/vms/vm1/console.log"
  for _ in $(seq 600); do grep -q '^ferry-writer: boot 1 seq [1-9][0-9]' "$CONSOLE_A" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ferry-writer: boot 1 seq' "$CONSOLE_A" || { echo "demo: the guest did not boot" >&2; tail "$CONSOLE_A" >&2; exit 1; }
  echo "guest console (onprem):"; grep '^ferry-' "$CONSOLE_A" | tail -n 3 | sed 's/^/  /'

  step "Pre-flight: what the destination says about moving vm1 there"
  onprem migrate vm1 --to cloud --map-network lan=cloud-lan --preflight

  step "Live-migrate vm1 to cloud while its writer keeps appending (max downtime $MAX_DOWNTIME)"
  onprem migrate vm1 --to cloud --map-network lan=cloud-lan --max-downtime "$MAX_DOWNTIME" --wait

  step "Where the guest runs now: the same boot, its writer goes on at cloud"
  onprem vm list
  cloud vm list
  last=$(grep -o 'seq [0-9]*' "$CONSOLE_A" | tail -n 1)
  echo "last record written at onprem: $last"
  sleep 3
  echo "guest console (cloud):"; grep '^ferry-' "$CONSOLE_B" | tail -n 3 | sed 's/^/  /'

  step "Stop the guest at cloud and check every record on its disk"
  cloud vm stop vm1
  $PY tests/guest/check_records.py "$TMP/cloud/data/disks/vda.img"
else
step "At onprem: a $DISK_SIZE disk, $FILL% of it written, and a VM that writes to it all the time"
onprem disk create vda --size "$DISK_SIZE"
onprem vm create vm1 --driver sim --disk vda --workload "$WORKLOAD"
STATE="$TMP/onprem/data/vms/vm1/state.sim"
printf '$ ferry-simvm fill --percent %s ...   (the VM writes %s%% of its disk, so there is data to move)\n' "$FILL" "$FILL"
"$BUILD/ferry-simvm" fill --state "$STATE" --create --percent "$FILL" \
  --disk "vda=nbd+unix:///vda?socket=$TMP/onprem/nbd.sock" --log-level warn
onprem vm start vm1
sleep 2
onprem vm show vm1
onprem disk show vda | head -n 8

step "Live-migrate vm1 to cloud while it keeps writing (max downtime $MAX_DOWNTIME)"
onprem migrate vm1 --to cloud --max-downtime "$MAX_DOWNTIME" --wait

step "Where the VM runs now"
onprem vm list
cloud vm list
cloud vm show vm1
echo "(onprem's copy of the disk is fenced: writes there are refused, cloud is authoritative)"
"$BUILD/ferry" --api "${API[onprem]}" -o json disk show vda |
  $PY -c 'import json,sys; print("onprem vda fence:", json.load(sys.stdin)["fence"])'

step "The VM's own check at the destination: every block against what it wrote"
cloud vm verify vm1

step "Stop the VM and both sites"
cloud vm stop vm1
fi
for site in onprem cloud; do
  kill -TERM "${PID[$site]}"
  rc=0
  wait "${PID[$site]}" || rc=$?
  PID[$site]=
  echo "$site: ferryd exited with $rc"
  [ "$rc" -eq 0 ] || exit 1
done
echo
bold "Demo done."
