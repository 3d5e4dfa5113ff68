#!/usr/bin/env bash
# One ctest test of a libFuzzer harness: every checked-in input (seeds, then the regression cases
# of bugs found before) once, then fuzzing for a bounded time from them. New inputs go to a scratch
# corpus in the build folder; a crash, leak, timeout or sanitizer report fails the test and leaves
# its input in the artifacts folder (move it to tests/fuzz/regressions/<harness>/ with the fix).
#   run_fuzzer.sh HARNESS_BINARY NAME SOURCE_DIR BUILD_DIR SECONDS
set -euo pipefail
exe=$1 name=$2 src=$3 build=$4 seconds=$5
scratch=$build/fuzz/corpus/$name artifacts=$build/fuzz/artifacts
mkdir -p "$scratch" "$artifacts"
inputs=("$src/corpus/$name")
[[ -d $src/regressions/$name ]] && inputs+=("$src/regressions/$name")
# Capped allocations fail at once (std::bad_alloc, an accepted answer) instead of paging for
# minutes; leaks are findings.
# (verify_asan_link_order=0: libFuzzer puts libstdc++, which defines no allocator, before the runtime;
# intercept_tls_get_addr=0: see run_tests in cmake/kmoe, the tracer crash of clang 14's runtime)
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}allocator_may_return_null=1:max_allocation_size_mb=2048:detect_leaks=1:verify_asan_link_order=0:intercept_tls_get_addr=0
export ASAN_OPTIONS=$ASAN_OPTIONS:suppressions=$src/../sanitizers/asan.supp LSAN_OPTIONS=suppressions=$src/../sanitizers/lsan.supp
export TMPDIR=$build/fuzz
"$exe" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=6144 -max_len=65536 -print_final_stats=1 \
  -artifact_prefix="$artifacts/$name-" "$scratch" "${inputs[@]}" \
  > "$build/fuzz/$name.log" 2>&1 || { tail -n 60 "$build/fuzz/$name.log"; echo "fuzz $name: FAILED (log: $build/fuzz/$name.log)"; exit 1; }
runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$build/fuzz/$name.log" | awk '{print $2}')
echo "fuzz $name: $runs executions in ${seconds} s, no finding (corpus: $(ls "$scratch" | wc -l) new inputs)"
