#!/usr/bin/env bash
# nvcc's register and spill report for every CUDA kernel, without a GPU:
#   bash scripts/ptxas_report.sh [ARCH]        ARCH: sm_90 (default, the `gpu` preset's Hopper target)
# Compiles each engine/cuda/*.cu for the device only (-cubin: no host compile) with `-Xptxas -v`, with the flags and
# includes of the `gpu` preset (nvcc -O3, C++17, the engine's include root; see third_party/cmake/moelab_cuda.cmake and
# build/gpu/compile_commands.json), and prints one line per kernel:
#   file, registers per thread, spill stores/loads (bytes), static shared memory (bytes; dynamic shared memory is
#   sized at launch and not in it), stack frame (bytes), barriers, kernel
# Rows with spills are marked "SPILL". Takes a few minutes on 2 cores (run it under nice). docs/performance.md keeps
# the table.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
arch=${1:-sm_90}
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$nvcc" ] || { echo "no nvcc (looked on PATH and in /usr/local/cuda/bin)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The engine's include root, as third_party/cmake/moelab_layers.cmake makes it: a folder holding a link to engine/.
mkdir -p "$work/layers"
ln -s "$root/engine" "$work/layers/engine"

echo "# $("$nvcc" --version | grep -o 'release [0-9.]*'), -arch=$arch -O3, $(date -u '+%Y-%m-%d')"
printf '%-17s %5s %8s %8s %6s %6s %4s  %s\n' file regs spill_st spill_ld smem stack bar kernel
for cu in engine/cuda/*.cu; do
  log=$work/$(basename "$cu").log
  if ! "$nvcc" -cubin -arch="$arch" -O3 -std=c++17 -DNDEBUG -DMOELAB_CUDA_SIM=0 -DMOELAB_HAVE_CUDA=1 \
    -DFMT_HEADER_ONLY=1 -I"$work/layers" -isystem "$root/third_party/fmt/include" \
    -Xptxas -v -o "$work/out.cubin" "$cu" >"$log" 2>&1; then
    echo "$cu: nvcc failed:" >&2
    cat "$log" >&2
    exit 1
  fi
  # ptxas prints, per entry function: "Compiling entry function 'NAME'", then "N bytes stack frame, N bytes spill
  # stores, N bytes spill loads", then "Used N registers, used N barriers, N bytes smem, ...".
  awk -v file="$(basename "$cu")" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2);
                                 stack = st = ld = 0; next }
    /bytes stack frame/ { for (i = 1; i <= NF; ++i) { if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = $i;
                                                      if ($(i + 2) == "spill" && $(i + 3) == "stores,") st = $i;
                                                      if ($(i + 2) == "spill" && $(i + 3) == "loads") ld = $i } next }
    /Used [0-9]+ registers/ && name != "" {
      regs = bar = smem = 0
      for (i = 1; i <= NF; ++i) { if ($(i + 1) ~ /^registers/) regs = $i; if ($(i + 1) ~ /^barriers/) bar = $i;
                                  if ($(i + 1) == "bytes" && $(i + 2) ~ /^smem/) smem = $i }
      print file "\t" regs "\t" st "\t" ld "\t" smem "\t" stack "\t" bar "\t" name; name = "" }
  ' "$log"
done | while IFS=$'\t' read -r file regs st ld smem stack bar name; do
  # Demangled, without `void`, the namespaces and the arguments: `void moelab::cuda::k<float>(...)` -> k<float>
  short=$(echo "$name" | c++filt | sed -e 's/^void //; s/moelab::cuda:://g; s/moelab:://g; s/(anonymous namespace):://g' -e 's/(.*)$//')
  mark=""
  if [ "$st" != 0 ] || [ "$ld" != 0 ]; then mark="  SPILL"; fi
  printf '%-17s %5s %8s %8s %6s %6s %4s  %s%s\n' "$file" "$regs" "$st" "$ld" "$smem" "$stack" "$bar" "$short" "$mark"
done
