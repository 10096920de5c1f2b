#!/usr/bin/env bash
# test.sh: ferry's whole test suite, as CI runs it (.ci/run).
#
#   1. scripts/setup.sh             packages (no-op when all are present)
#   2. ASan+UBSan build, -Werror    build-asan/
#   3. unit tests                   meson test -C build-asan
#   4. fuzz build + a short run     every build-fuzz/fuzz/fuzz_NAME on fuzz/corpus/NAME
#   5. integration tests            pytest tests/integration against build-asan
#
# Knobs (environment):
#   FUZZ_SECONDS   how long each fuzz target runs (default 45; 0 skips the runs, not the build)
#   SKIP_FUZZ=1    skip step 4 entirely (local iteration only; CI runs it)
#   PYTEST_ARGS    extra pytest arguments, e.g. "-k cbt -x"
# Exits non-zero on the first failing step.  Budget: well under 20 minutes on
# 2 cores (builds ~3 min, fuzz 1 min, integration a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n=== test.sh: %s ===\n' "$*"; }
started=$(date +%s)

# Sanitizers: any report is fatal (UBSan included), leaks are reported at exit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=1:print_summary=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1:print_summary=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-print_suppressions=0}
export PYTHONDONTWRITEBYTECODE=1

step "setup"
scripts/setup.sh

step "build ASan/UBSan (-Werror) in build-asan"
scripts/build.sh asan build-asan

step "unit tests"
meson test -C build-asan --print-errorlogs --num-processes 2

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  step "build fuzzers in build-fuzz"
  scripts/build.sh fuzz build-fuzz

  # Every fuzz_NAME built in build-fuzz runs for FUZZ_SECONDS on its seed
  # corpus fuzz/corpus/NAME (dictionary fuzz/NAME.dict when present).
  secs=${FUZZ_SECONDS:-45}
  if [ "$secs" -gt 0 ]; then
    for exe in build-fuzz/fuzz/fuzz_*; do
      [ -x "$exe" ] && [ -f "$exe" ] || continue
      name=${exe#build-fuzz/fuzz/fuzz_}
      step "fuzz_$name for ${secs}s"
      if [ "$name" = nbd ] && { [ ! -d fuzz/corpus/nbd ] || [ -z "$(ls -A fuzz/corpus/nbd)" ]; }; then
        /usr/bin/python3 fuzz/make_corpus.py
      fi
      # New inputs go to a scratch corpus in the build dir; the seeds stay as committed.
      work=build-fuzz/corpus-$name
      artifacts=build-fuzz/artifacts-$name
      mkdir -p "$work" "$artifacts"
      seeds=()
      [ -d "fuzz/corpus/$name" ] && seeds=("fuzz/corpus/$name")
      dict=()
      [ -f "fuzz/$name.dict" ] && dict=(-dict="fuzz/$name.dict")
      ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=1:print_summary=1" \
      "$exe" -max_total_time="$secs" -max_len=65536 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
        -artifact_prefix="$artifacts/" "$work" "${seeds[@]}" \
        > "build-fuzz/fuzz_$name.log" 2>&1 || {
          echo "fuzz_$name FAILED; last lines of build-fuzz/fuzz_$name.log:" >&2
          tail -n 60 "build-fuzz/fuzz_$name.log" >&2
          ls -l "$artifacts" >&2
          exit 1
        }
      grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done )' "build-fuzz/fuzz_$name.log" || true
    done
  fi
fi

step "integration tests (pytest, FERRY_BUILD=build-asan)"
export FERRY_BUILD="$ROOT/build-asan"
# Debian's interpreter: it has pytest and python3-libnbd (a pyenv python may not).
# shellcheck disable=SC2086
/usr/bin/python3 -m pytest -v -p no:cacheprovider --durations=15 tests/integration ${PYTEST_ARGS:-}

step "all passed in $(( $(date +%s) - started ))s"
