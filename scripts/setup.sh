#!/usr/bin/env bash
# setup.sh: installs what ferry's build, tests, demo and benchmarks need on a
# fresh Debian 12.  Idempotent: when every package is already installed it
# touches nothing (no apt at all); otherwise it runs `apt-get update` once and
# installs only what is missing.  Works as root, or through sudo otherwise.
set -euo pipefail

PACKAGES=(
  # build
  meson ninja-build pkg-config gcc clang
  libclang-rt-14-dev            # libFuzzer, ASan/UBSan/LSan runtimes for clang
  libzstd-dev libxxhash-dev libssl-dev libsqlite3-dev libjansson-dev
  libmicrohttpd-dev libcurl4-openssl-dev libnbd-dev
  # NBD peers used by the tests, the demo and the benchmarks
  libnbd-bin                    # nbdinfo, nbdcopy
  python3-libnbd                # python `import nbd`, nbdsh
  nbdkit qemu-utils fio
  rsync                         # the migration benchmark's reference
  # the test guest (tests/guest/build.sh, docs/guest.md): QEMU (TCG), a static
  # busybox and writer (libc.a), the Debian kernel's .deb unpacked by the build
  # (xz/zstd payloads, depmod for modules.dep); the kernel is not installed
  qemu-system-x86 busybox-static libc6-dev xz-utils zstd kmod
  # test runner and helpers
  python3 python3-pytest curl procps coreutils sqlite3
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "setup: not root and no sudo; install these by hand: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup: done"
