#!/bin/sh
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600), all at once at the lowest
# CPU priority, seeded from fuzz/corpus/<target>/ (the committed seeds). New inputs go to a scratch
# corpus under fuzz/target/, so the committed corpus stays small; crashes land in
# fuzz/artifacts/<target>/. Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain
# works with RUSTC_BOOTSTRAP=1 for the -Z flags cargo-fuzz passes.
set -eu
seconds=${1:-600}
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }
cargo fuzz build -O
targets=$(cargo fuzz list)
mkdir -p target/logs
for t in $targets; do
  mkdir -p "target/corpus/$t"
  nice -n 19 cargo fuzz run -O "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    >"target/logs/$t.log" 2>&1 &
done
status=0
wait || status=$?
printf '%-14s %12s %10s %8s %8s %s\n' target runs execs/s cov ft crashes
for t in $targets; do
  log="target/logs/$t.log"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  printf '%-14s %12s %10s %8s %8s %s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$crashes"
  [ "$crashes" -eq 0 ] || status=1
done
exit $status
