#!/usr/bin/env bash
# Prepares the GPU check on a machine without a GPU, so that the GPU's minutes go to running, not building.
#   bash scripts/gpu_prepare.sh            the CUDA backend with nvcc for Hopper (sm_90), warnings as errors
#   MOELAB_GPU_CHECK_PRESET=sim bash scripts/gpu_prepare.sh
#                                          the emulator build instead: a rehearsal of scripts/gpu_check.sh here
# Builds the preset into build/gpu-prepared with the vendored header-only dependencies and without SentencePiece, the
# C++ runtime linked statically: the binaries then need only the CUDA toolkit's libraries, libgomp and glibc, which a
# machine with nvcc has. Copies them, with a stamp of the sources they were built from, into gpu-prepared/ (ignored
# by git). scripts/gpu_check.sh uses them when the stamp matches its sources and they start; else it builds.
# With the device tool: carry ["gpu-prepared"], command "bash scripts/gpu_check.sh $OUT" (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${MOELAB_GPU_CHECK_PRESET:-gpu}
build=build/gpu-prepared
prepared=gpu-prepared
sources=$(bash scripts/source_hash.sh)  # before the build: a file edited during it makes the stamp stale, not wrong

# The header-only packages and pkg-config (SentencePiece) are not looked for: third_party/ serves the headers.
no_system=()
for package in fmt doctest nlohmann_json CLI11 tomlplusplus PkgConfig; do
  no_system+=("-DCMAKE_DISABLE_FIND_PACKAGE_${package}=ON")
done
rm -rf "$build"
cmake --preset "$preset" -B "$build" "${no_system[@]}" \
  -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" >/dev/null
time cmake --build "$build" -j "$(nproc)"

rm -rf "$prepared"
mkdir -p "$prepared/bin"
cp "$build"/tests/moelab_tests "$build"/bin/* "$prepared/bin/"
{
  echo "sources $sources"
  echo "preset $preset"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -n) with $(
    if [ "$preset" = sim ]; then c++ --version | head -n1; else /usr/local/cuda/bin/nvcc --version | tail -n2 | head -n1; fi)"
} >"$prepared/STAMP"
cat "$prepared/STAMP"
du -sh "$prepared"
