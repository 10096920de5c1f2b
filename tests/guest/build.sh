#!/usr/bin/env bash
# build.sh: builds ferry's tiny test guest (docs/guest.md) into OUTDIR.
#
#   tests/guest/build.sh [OUTDIR]        (default: build-guest/ in the repo root)
#
# Produces:
#   OUTDIR/vmlinux             Debian's kernel as an uncompressed ELF, booted by
#                              QEMU through PVH: qemu-system-x86_64 -kernel vmlinux
#   OUTDIR/vmlinuz             the same kernel as Debian ships it (bzImage), the
#                              fallback (-kernel vmlinuz boots through SeaBIOS: slower)
#   OUTDIR/initramfs.cpio.gz   busybox, the virtio-blk modules, /init, /bin/writer
#   OUTDIR/ferry-guest-writer  the record writer (tests/guest/writer.c), static
#   OUTDIR/guest.json          what was built: kernel package and release, boot
#                              method, module load order, paths
#
# Needs (scripts/setup.sh installs them): gcc and a static libc, busybox-static,
# xz-utils, zstd, kmod (depmod), python3, apt.  The kernel is not installed:
# `apt-get download` fetches the .deb of the package linux-image-amd64 depends
# on (or FERRY_GUEST_KERNEL=linux-image-6.1.0-NN-amd64) into OUTDIR/cache and
# `dpkg-deb -x` unpacks it in a scratch dir that is removed afterwards.
#
# Cached and idempotent: the kernel step runs once per kernel package (the
# package chosen the first time is kept until OUTDIR is removed or
# FERRY_GUEST_KERNEL names another one); the writer and initramfs are rebuilt
# only when their inputs (this script, writer.c, init, mkcpio.py, busybox,
# the kernel step) change.  With everything up to date it runs no compiler and
# asks apt nothing.  Independent of the ferry build (meson) altogether.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-$ROOT/build-guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Bump when the kernel step below changes what it produces.
KERNEL_STEP_VERSION=1
# Modules /dev/vda needs; their dependencies come from the kernel's modules.dep.
WANT_MODULES=(virtio_pci virtio_blk)
BUSYBOX=${BUSYBOX:-/bin/busybox}
CFLAGS=(-static -O2 -std=gnu17 -Wall -Wextra -Wshadow -Wvla -Wstrict-prototypes -Werror -s)

log() { echo "guest-build: $*" >&2; }
die() { echo "guest-build: ERROR: $*" >&2; exit 1; }

# One build at a time per OUTDIR (two pytest sessions may start together).
exec 9>"$OUT/.lock"
flock 9

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

# --- kernel -------------------------------------------------------------
kernel_pkg=${FERRY_GUEST_KERNEL:-}
if [ -z "$kernel_pkg" ] && [ -f "$OUT/.kernel.done" ]; then
  kernel_pkg=$(cut -d' ' -f1 "$OUT/.kernel.done")
fi
if [ -z "$kernel_pkg" ]; then
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    log "apt knows no linux-image-amd64: apt-get update"
    "${SUDO[@]}" apt-get update -q >&2
  fi
  kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
               sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
  [ -n "$kernel_pkg" ] || die "cannot resolve linux-image-amd64 to a linux-image-6.x-amd64 package"
fi

kernel_stamp="$kernel_pkg $KERNEL_STEP_VERSION"
if [ "$(cat "$OUT/.kernel.done" 2>/dev/null)" != "$kernel_stamp" ] ||
   [ ! -f "$OUT/vmlinux" ] || [ ! -f "$OUT/vmlinuz" ] || [ ! -f "$OUT/modules/order" ]; then
  t0=$(date +%s)
  rm -f "$OUT/.kernel.done" "$OUT/.initramfs.done"
  mkdir -p "$OUT/cache"
  debs=("$OUT/cache/${kernel_pkg}"_*.deb)     # the pattern itself when none
  deb=${debs[0]}
  if [ ! -f "$deb" ]; then
    log "downloading $kernel_pkg"
    rm -rf "$OUT/cache/dl" && mkdir -p "$OUT/cache/dl"
    # -o APT::Sandbox::User=root: apt's _apt user may not write into OUTDIR.
    (cd "$OUT/cache/dl" && apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg" >&2) ||
      die "apt-get download $kernel_pkg failed"
    rm -f "$OUT"/cache/linux-image-*.deb        # one kernel in the cache
    mv "$OUT"/cache/dl/*.deb "$OUT/cache/" && rmdir "$OUT/cache/dl"
    debs=("$OUT/cache/${kernel_pkg}"_*.deb)
    deb=${debs[0]}
    [ -f "$deb" ] || die "apt-get download $kernel_pkg left no ${kernel_pkg}_*.deb"
  fi
  log "unpacking $(basename "$deb")"
  tree="$OUT/cache/unpacked"
  rm -rf "$tree"
  dpkg-deb -x "$deb" "$tree"
  releases=("$tree"/lib/modules/*)
  release=${releases[0]##*/}
  if [ ! -f "$tree/boot/vmlinuz-$release" ]; then
    die "$deb holds no boot/vmlinuz-$release"
  fi
  bz="$tree/boot/vmlinuz-$release"

  # vmlinux for PVH.  QEMU 7.2 boots an ELF given to -kernel through PVH only
  # when it carries the XEN_ELFNOTE_PHYS32_ENTRY note (type 18, owner "Xen"),
  # which x86 kernels built with CONFIG_PVH=y (Debian's) have; a bzImage goes
  # through SeaBIOS and the kernel's own decompressor instead, about 4 s more
  # under TCG.  The bzImage's payload is that ELF, compressed (xz for
  # Debian 12: CONFIG_KERNEL_XZ=y).  Instead of extract-vmlinux's scan for a
  # compression magic anywhere in the file (which can hit a false match), it
  # is cut out exactly where the x86 boot header says: payload_offset (u32 at
  # 0x248, protocol >= 2.08) counted from the protected-mode code, which
  # starts after (setup_sects (u8 at 0x1f1) + 1) * 512 bytes; payload_length
  # at 0x24c.  The decompressor is chosen by the payload's magic.
  u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
  u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
  [ "$(od -An -c -j 0x202 -N4 "$bz" | tr -d ' ')" = HdrS ] || die "$bz: no x86 boot header"
  setup_sects=$(u8 "$bz" $((0x1f1)))
  [ "$setup_sects" -ne 0 ] || setup_sects=4
  pm_start=$(( (setup_sects + 1) * 512 ))
  pay_off=$(( pm_start + $(u32 "$bz" $((0x248))) ))
  pay_len=$(u32 "$bz" $((0x24c)))
  magic=$(od -An -tx1 -j "$pay_off" -N6 "$bz" | tr -d ' \n')
  case "$magic" in
    fd377a585a00*) unpack=(xz -dc --single-stream); comp=xz ;;
    28b52ffd*)     unpack=(zstd -dcq);              comp=zstd ;;
    1f8b*)         unpack=(gzip -dc);               comp=gzip ;;
    *) die "$bz: payload at $pay_off starts with $magic: not xz, zstd or gzip" ;;
  esac
  log "kernel $release: $comp payload of $pay_len bytes at $pay_off; decompressing"
  # The kernel appends the uncompressed size after the stream; zstd and gzip
  # complain about those trailing bytes, so their exit status is not trusted:
  # the result is checked below instead.
  tail -c +$((pay_off + 1)) "$bz" | head -c "$pay_len" | "${unpack[@]}" > "$OUT/vmlinux.tmp" 2>/dev/null || true
  [ "$(od -An -c -N4 "$OUT/vmlinux.tmp" | tr -d ' ')" = '177ELF' ] ||
    die "decompressed payload of $bz is not an ELF"
  if readelf -nW "$OUT/vmlinux.tmp" | awk '$1 == "Xen" && /\(0x00000012\)/ { f = 1 } END { exit !f }'; then
    boot=pvh
  else
    boot=bzimage
    log "WARNING: $release's vmlinux has no Xen PVH note: QEMU cannot boot it as -kernel;" \
        "guest.json says to boot vmlinuz (bzImage)"
  fi
  mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
  cp "$bz" "$OUT/vmlinuz"

  # Modules: the real dependency list from this kernel's modules.dep (the .deb
  # ships none: depmod writes it), loaded depth-first so that every module
  # comes after what it depends on.  Compressed modules are decompressed here
  # because busybox's insmod may not read .ko.xz / .ko.zst.
  depmod -b "$tree" "$release"
  mdir="$tree/lib/modules/$release"
  declare -A deps=() path_of=() seen=()
  while IFS= read -r line; do
    m=${line%%:*}
    name=${m##*/}; name=${name%%.ko*}
    path_of[$name]=$m
    d=""
    for p in ${line#*:}; do b=${p##*/}; d+=" ${b%%.ko*}"; done
    deps[$name]=$d
  done < "$mdir/modules.dep"
  order=()
  visit() {
    local n=$1 x
    [ -n "${seen[$n]:-}" ] && return
    seen[$n]=1
    [ -n "${path_of[$n]:-}" ] || die "module $n is not in $release's modules.dep (built in?)"
    for x in ${deps[$n]}; do visit "$x"; done
    order+=("$n")
  }
  for w in "${WANT_MODULES[@]}"; do visit "$w"; done
  rm -rf "$OUT/modules" && mkdir -p "$OUT/modules"
  for n in "${order[@]}"; do
    src="$mdir/${path_of[$n]}"
    case "$src" in
      *.ko.xz)  xz -dc "$src" > "$OUT/modules/$n.ko" ;;
      *.ko.zst) zstd -dcq "$src" > "$OUT/modules/$n.ko" ;;
      *.ko.gz)  gzip -dc "$src" > "$OUT/modules/$n.ko" ;;
      *.ko)     cp "$src" "$OUT/modules/$n.ko" ;;
      *) die "module $src: unknown compression" ;;
    esac
    echo "$n.ko" >> "$OUT/modules/order"
  done
  echo "$release" > "$OUT/modules/release"
  echo "$boot" > "$OUT/modules/boot"
  rm -rf "$tree"
  echo "$kernel_stamp" > "$OUT/.kernel.done"
  log "kernel step done in $(( $(date +%s) - t0 ))s: $release, boot $boot, modules: ${order[*]}"
fi

# --- writer and initramfs ------------------------------------------------
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
inputs=$( { cat "$HERE/build.sh" "$HERE/writer.c" "$HERE/init" "$HERE/mkcpio.py" \
                "$OUT/.kernel.done" "$OUT/modules/order";
            sha256sum "$BUSYBOX"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$OUT/.initramfs.done" 2>/dev/null)" = "$inputs" ] &&
   [ -f "$OUT/initramfs.cpio.gz" ] && [ -x "$OUT/ferry-guest-writer" ] && [ -f "$OUT/guest.json" ]; then
  log "up to date in $OUT"
  exit 0
fi

rm -f "$OUT/.initramfs.done"
gcc "${CFLAGS[@]}" -o "$OUT/ferry-guest-writer.tmp" "$HERE/writer.c"
if readelf -lW "$OUT/ferry-guest-writer.tmp" | grep INTERP >/dev/null; then
  die "ferry-guest-writer is not static"
fi
mv "$OUT/ferry-guest-writer.tmp" "$OUT/ferry-guest-writer"
if readelf -lW "$BUSYBOX" | grep INTERP >/dev/null; then
  die "$BUSYBOX is dynamically linked: the guest needs busybox-static"
fi

st="$OUT/initramfs.d"
rm -rf "$st"
mkdir -p "$st"/{bin,etc,lib/modules,proc,sys,dev,tmp}
cp "$BUSYBOX" "$st/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -s busybox "$st/bin/$a"
done
cp "$OUT/ferry-guest-writer" "$st/bin/writer"
install -m 0755 "$HERE/init" "$st/init"
cp "$OUT"/modules/*.ko "$st/lib/modules/"
cp "$OUT/modules/order" "$st/etc/ferry-modules"
python3 "$HERE/mkcpio.py" "$st" "$OUT/initramfs.cpio.gz"
rm -rf "$st"

boot=$(cat "$OUT/modules/boot")
kernel=vmlinux; [ "$boot" = pvh ] || kernel=vmlinuz
python3 - "$OUT" "$kernel_pkg" "$(cat "$OUT/modules/release")" "$boot" "$kernel" <<'EOF'
import json, os, sys
out, pkg, release, boot, kernel = sys.argv[1:]
mods = open(os.path.join(out, "modules", "order")).read().split()
info = {"kernel_package": pkg, "kernel_release": release, "boot": boot,
        "kernel": os.path.join(out, kernel), "vmlinux": os.path.join(out, "vmlinux"),
        "vmlinuz": os.path.join(out, "vmlinuz"),
        "initrd": os.path.join(out, "initramfs.cpio.gz"),
        "writer": os.path.join(out, "ferry-guest-writer"), "modules": mods}
with open(os.path.join(out, "guest.json.tmp"), "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
os.replace(os.path.join(out, "guest.json.tmp"), os.path.join(out, "guest.json"))
EOF
echo "$inputs" > "$OUT/.initramfs.done"
log "built $OUT (kernel $(cat "$OUT/modules/release"), boot $boot," \
    "initramfs $(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"
