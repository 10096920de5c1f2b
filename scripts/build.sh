#!/usr/bin/env bash
# build.sh: configures (meson) and builds (ninja) one flavour of ferry.
#
#   scripts/build.sh [release|asan|fuzz] [BUILD_DIR]
#
#   release  build/       -Dbuildtype=release (the default flavour)
#   asan     build-asan/  AddressSanitizer + UndefinedBehaviorSanitizer, -Werror
#   fuzz     build-fuzz/  CC=clang, -Dfuzz=true: libFuzzer targets (fuzz_nbd)
#
# An existing build dir is reconfigured with the same options (so it is safe to
# run again); NINJA_JOBS limits parallelism (default: ninja's own).
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=${1:-release}
case "$flavour" in
  release) dir=${2:-build}
           opts=(-Dbuildtype=release -Dfuzz=false) ;;
  asan)    dir=${2:-build-asan}
           opts=(-Dbuildtype=debugoptimized "-Db_sanitize=address,undefined"
                 -Db_lundef=false -Dwerror=true -Dfuzz=false) ;;
  fuzz)    dir=${2:-build-fuzz}
           export CC=${FUZZ_CC:-clang}
           opts=(-Dbuildtype=debugoptimized "-Db_sanitize=address,undefined"
                 -Db_lundef=false -Dfuzz=true) ;;
  -h|--help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0 ;;
  *) echo "build.sh: unknown flavour '$flavour' (release, asan, fuzz)" >&2; exit 2 ;;
esac

if [ -f "$dir/build.ninja" ]; then
  # --reconfigure cannot change the compiler; a fuzz dir set up with gcc is redone.
  if [ "$flavour" = fuzz ] && ! grep -q "clang" "$dir/meson-info/intro-compilers.json" 2>/dev/null; then
    rm -rf "$dir"
    meson setup "$dir" "${opts[@]}"
  else
    meson configure "$dir" "${opts[@]}" >/dev/null
  fi
else
  meson setup "$dir" "${opts[@]}"
fi

ninja -C "$dir" ${NINJA_JOBS:+-j "$NINJA_JOBS"}
echo "build.sh: $flavour build in $dir"
