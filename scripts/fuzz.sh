#!/usr/bin/env bash
# Runs one libFuzzer target for a while, from the seed corpus (docs/reliability.md).
#   bash scripts/fuzz.sh TARGET [SECONDS]     TARGET: safetensors | checkpoint | jsonl | shard | toml | flags; SECONDS default 60
# Builds the fuzz preset (clang, ASan + UBSan; Debian: clang libclang-rt-14-dev libomp-dev). The corpus grows in
# build/fuzz/corpus/TARGET (seeded from tests/data/fuzz/TARGET); a finding is written as build/fuzz/crash-* etc.
# Replay one: build/fuzz/tests/fuzz_TARGET FILE. Add a fixed finding to tests/data/fuzz/TARGET/ only if it is valid.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 1 || $# > 2)); then
  echo "usage: $0 TARGET [SECONDS]" >&2
  exit 2
fi
target=$1
seconds=${2:-60}
cmake --preset fuzz >/dev/null
cmake --build build/fuzz --target "fuzz_$target"
corpus=build/fuzz/corpus/$target
mkdir -p "$corpus"
cp -n tests/data/fuzz/"$target"/* "$corpus"/
cd build/fuzz
ASAN_OPTIONS=detect_leaks=0 ./tests/"fuzz_$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
  "corpus/$target"
