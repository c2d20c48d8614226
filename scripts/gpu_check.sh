#!/usr/bin/env bash
# The GPU check: one command for a machine with a GPU (nvcc, 16 cores, PyTorch there), under 8 minutes.
#   bash scripts/gpu_check.sh OUTDIR
# 1. env.txt       the machine: GPU, driver, nvcc, cmake, python and torch, the binaries' stamp
# 2. build.log     only when it builds: the binaries of scripts/gpu_prepare.sh (gpu-prepared/) are used when their
#                  stamp matches these sources and they start here; else the `gpu` preset is built here
# 3. junit.xml     the whole test suite, CUDA tests included (doctest, one process); tests.log its console output
# 4. sanitizer.log compute-sanitizer memcheck and racecheck on the CUDA tests (skipped, with the reason, where the tool
#                  is missing or refuses the device)
# 5. race.log      the speed race (docs/performance.md): `moe-bench train-step --device cuda --precision bf16` against
#                  the four PyTorch variants, presets S then M, in the time the checks above left; then for both,
#                  as long as time is left: our step with the experts' products on padded rows (--expert-gemm
#                  padded), the experts alone against a loop and torch._grouped_mm (moe-bench experts), attention
#                  alone against PyTorch's SDPA (moe-bench attention), our step with one cuBLAS call per expert
#                  (--expert-gemm per-expert); the tables go into the summary
# 6. summary.txt   what passed and failed, and the race's tables, printed last
# At most 8 files in OUTDIR. Exits 0 when it ran through (read the summary for the verdict), 2 on a usage error.
# MOELAB_GPU_CHECK_PRESET=sim rehearses it on a machine without a GPU (with gpu_prepare.sh's sim build; the race runs
# the tiny config for 2 steps there: the emulator has no speed to measure).
# MOELAB_GPU_CHECK_RACE=only skips the tests and the sanitizers (a second run for the race alone); =off skips the race.
# MOELAB_GPU_CHECK_BUDGET_S (default 510): the sanitizers and the race stop at this many seconds from the start.
set -uo pipefail
if (($# != 1)); then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
root=$PWD
preset=${MOELAB_GPU_CHECK_PRESET:-gpu}
race=${MOELAB_GPU_CHECK_RACE:-on}
budget=${MOELAB_GPU_CHECK_BUDGET_S:-510}
started=$SECONDS
summary=()
note() { summary+=("$*"); }
# The seconds a step may take: the wanted ones, or what is left of the budget; fails when under 15 s are left. The
# steps after the build and the tests (which come first, 300 s at most each) are capped so: the whole stays within
# the budget, give or take the 10 s a timeout waits before it kills.
allowance() {  # wanted
  local left=$((budget - (SECONDS - started)))
  ((left >= 15)) || return 1
  echo $((left < $1 ? left : $1))
}

# ---- 1. the machine ------------------------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host: $(uname -n), $(nproc) cores, $(uname -r)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  echo "nvcc: $( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | grep -o 'release [0-9.]*' || echo none)"
  echo "cmake: $(cmake --version 2>/dev/null | head -n1)"
  echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo none)"
  echo "python3: $(command -v python3) $(python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -n1)"
  echo "sources: $(bash scripts/source_hash.sh)"
  echo "prepared binaries:"
  sed 's/^/  /' gpu-prepared/STAMP 2>/dev/null || echo "  none"
} >"$out/env.txt" 2>&1
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)
note "gpu: ${gpu:-none found} ($(date -u '+%Y-%m-%d'))"

# ---- 2. the binaries -----------------------------------------------------------------------------------------------
bin=
if [ -f gpu-prepared/STAMP ]; then
  if ! grep -q "^sources $(bash scripts/source_hash.sh)\$" gpu-prepared/STAMP; then
    why="gpu-prepared/ was built from other sources"
  elif ! grep -q "^preset $preset\$" gpu-prepared/STAMP; then
    why="gpu-prepared/ holds another preset's build"
  elif ! gpu-prepared/bin/moelab_tests --count >/dev/null 2>&1; then
    why="gpu-prepared/bin/moelab_tests does not start here: $(gpu-prepared/bin/moelab_tests --count 2>&1 | head -n1)"
  else
    bin=$root/gpu-prepared/bin
    note "binaries: prepared ($(grep '^commit' gpu-prepared/STAMP))"
  fi
else
  why="no gpu-prepared/ (scripts/gpu_prepare.sh)"
fi
if [ -z "$bin" ]; then
  t0=$SECONDS
  if cmake --preset "$preset" -B build/gpu-check >"$out/build.log" 2>&1 &&
    timeout -k 10 300 cmake --build build/gpu-check -j "$(nproc)" >>"$out/build.log" 2>&1; then
    bin=$root/build/gpu-check/bin
    cp build/gpu-check/tests/moelab_tests "$bin/"
    note "binaries: built here in $((SECONDS - t0)) s ($why)"
  else
    note "binaries: BUILD FAILED after $((SECONDS - t0)) s ($why): see build.log"
  fi
fi

# ---- 3. the test suite ---------------------------------------------------------------------------------------------
# Python oracles: this machine's python3 (with PyTorch). Four OpenMP threads per test process.
export MOELAB_SOURCE_DIR=$root MOELAB_PYTHON=$(command -v python3 || echo /usr/bin/python3) OMP_NUM_THREADS=4
[ "$preset" = sim ] && export MOELAB_SIM_SCHEDULE=shuffled
if [ "$race" = only ]; then
  note "tests: skipped (MOELAB_GPU_CHECK_RACE=only)"
elif [ -n "$bin" ]; then
  t0=$SECONDS
  (cd "$out" && timeout -k 10 300 "$bin/moelab_tests" --reporters=junit --out="$out/junit.xml" --no-intro \
    >/dev/null 2>"$out/tests.log")
  status=$?
  result=$(python3 - "$out/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as e:
    print(f"no junit result ({e})"); sys.exit()
cases = root.iter("testcase")
failed, skipped, passed, cuda_run, warned = [], 0, 0, 0, []
for c in cases:
    name = c.get("name", "")
    if c.find("skipped") is not None: skipped += 1; continue
    # doctest writes a WARN that did not hold as a <failure type="WARN">: reported, not a failure
    failures = [f for f in c.findall("failure") if f.get("type") != "WARN"] + c.findall("error")
    if failures: failed.append(name)
    else: passed += 1
    if len(c.findall("failure")) > len(failures) - len(c.findall("error")): warned.append(name)
    if name.startswith("cuda"): cuda_run += 1
print(f"{passed} passed, {len(failed)} failed, {skipped} skipped; {cuda_run} CUDA tests ran")
for name in failed[:20]: print(f"  FAILED: {name}")
if len(failed) > 20: print(f"  ... and {len(failed) - 20} more (junit.xml)")
for name in warned[:5]: print(f"  warned: {name}")
EOF
  )
  note "tests (exit $status, $((SECONDS - t0)) s): $result"
fi

# ---- 4. compute-sanitizer ------------------------------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
: >"$out/sanitizer.log"
if [ "$race" = only ]; then
  note "sanitizer: skipped (MOELAB_GPU_CHECK_RACE=only)"
elif [ -z "$bin" ]; then
  note "sanitizer: skipped (no binaries)"
elif [ "$preset" = sim ] || [ ! -x "$sanitizer" ]; then
  note "sanitizer: skipped ($([ "$preset" = sim ] && echo 'the emulator build has no GPU' || echo 'no compute-sanitizer'))"
else
  # memcheck on every CUDA kernel test (the whole training steps are left to the suite: slow under the tool);
  # racecheck on the kernels that share memory between threads.
  run_tool() {  # tool, test filter, seconds
    local t0=$SECONDS seconds
    seconds=$(allowance "$3") || { note "sanitizer $1: skipped (the budget is spent)"; return; }
    echo "==== $1 on $2" >>"$out/sanitizer.log"
    timeout -k 10 "$seconds" "$sanitizer" --tool "$1" --error-exitcode 9 "$bin/moelab_tests" --test-case="$2" \
      --test-case-exclude="cuda: training*" --no-intro >>"$out/sanitizer.log" 2>&1
    local rc=$?
    if grep -q "Device not supported\|not supported on this" "$out/sanitizer.log"; then
      note "sanitizer $1: skipped (the tool refuses this device: sanitizer.log)"
    elif ((rc == 124)); then
      note "sanitizer $1: TIMED OUT after $seconds s (sanitizer.log)"
    elif ((rc == 9)); then
      note "sanitizer $1: ERRORS ($(grep -c '^=========  *\(Invalid\|Race\|Error\)' "$out/sanitizer.log") reports: sanitizer.log)"
    else
      note "sanitizer $1: clean (exit $rc, $((SECONDS - t0)) s; $(grep -o 'ERROR SUMMARY: [0-9]* error' "$out/sanitizer.log" | tail -n1))"
    fi
  }
  run_tool memcheck "cuda*" 150
  run_tool racecheck "cuda: nn*,cuda: reduce*,cuda: pointwise*,cuda: moe*,cuda: losses*" 120
fi

# ---- 5. the speed race ----------------------------------------------------------------------------------------------
# Last, so that it cannot starve the checks above; it gets what is left of $budget seconds. Sizing: S and M both run
# 16,384 tokens a step (32 x 512, 16 x 1024), about 2.7 and 10 TFLOP of model work: on an H200 a step of any side
# should take 10 ms to a few hundred ms, so 3 warm-ups + 10 timed steps cost seconds per variant; what costs is
# starting python and torch (~5-10 s a variant) and torch.compile, which compiles the unrolled forward and backward
# of 8 or 12 layers in its first step (not measured yet; expected 1-2 minutes). Each variant's script is stopped
# after --torch-timeout s (only that variant is lost, its row says so), the whole config after what is left.
race_one() {  # preset, seconds
  local cfg=$1 seconds=$2 args
  if [ "$preset" = sim ]; then  # the emulator: the flow only
    args=(--preset "$cfg" --steps 2 --warmup 1 --torch-timeout 60)
  else
    args=(--preset "$cfg" --steps 10 --warmup 3 --torch-timeout "$((seconds * 2 / 3))")
  fi
  echo "==== $cfg: moe-bench train-step --device cuda --precision bf16 ${args[*]} --breakdown" >>"$out/race.log"
  local t0=$SECONDS
  timeout "$seconds" "$bin/moe-bench" train-step --device cuda --precision bf16 "${args[@]}" --breakdown \
    --python "$race_python" --torch-script "$root/scripts/bench_torch_step.py" \
    >"$race_tmp" 2>&1
  local rc=$?
  cat "$race_tmp" >>"$out/race.log"
  if ((rc == 0)); then
    note "race $cfg ($((SECONDS - t0)) s):"
    # The table and what follows it (MFU, the phase breakdown), without the table's legend.
    while IFS= read -r line; do note "  $line"; done < <(sed -n '/^variant /,$p' "$race_tmp" | grep -v '^(ours/it\|^$')
  else
    note "race $cfg: $( ((rc == 124)) && echo "TIMED OUT after $seconds s" || echo "FAILED (exit $rc)") (race.log)"
  fi
}
# Our step once more with the experts' products run another way (the race runs them as grouped calls): padded or
# per-expert (--expert-gemm). Ours only: the table's first row, the kernel breakdown's expert line and the experts' load.
ours_with_expert_gemm() {  # preset, mode, seconds
  local cfg=$1 mode=$2 seconds args=(--preset "$1" --no-torch --expert-gemm "$2" --breakdown)
  seconds=$(allowance "$3") || { note "$cfg, $mode products: skipped (the budget is spent)"; return; }
  [ "$preset" = sim ] && args+=(--steps 2 --warmup 1) || args+=(--steps 10 --warmup 3)
  echo "==== $cfg: moe-bench train-step --device cuda --precision bf16 ${args[*]}" >>"$out/race.log"
  timeout "$seconds" "$bin/moe-bench" train-step --device cuda --precision bf16 "${args[@]}" >"$race_tmp" 2>&1
  local rc=$?
  cat "$race_tmp" >>"$out/race.log"
  if ((rc == 0)); then
    note "$cfg, $mode products: $(grep '^moelab bf16' "$race_tmp")"
    note "$cfg, $mode products: $(grep 'expert FFN' "$race_tmp" | sed 's/^ *//')"
    if [ "$mode" = padded ]; then
      note "$cfg, $mode products: $(grep '^expert load' "$race_tmp")"
      note "$cfg, $mode products: $(grep '^padded products' "$race_tmp")"
    fi
  else
    note "$cfg, $mode products: $( ((rc == 124)) && echo "TIMED OUT after $seconds s" || echo "FAILED (exit $rc)")"
  fi
}
# One part of a layer alone on the config's shapes, against PyTorch on the same inputs: `moe-bench attention` (ours
# in fp32, tiled on CUDA cores, and bf16, on the tensor cores, against scaled_dot_product_attention) or `moe-bench
# experts` (the MoE experts with every way of running their products against a loop over experts and
# torch._grouped_mm), each with the distance of the results from ours.
alone_one() {  # attention|experts, preset, seconds
  local bench=$1 cfg=$2 seconds args=(--preset "$2" --device cuda)
  seconds=$(allowance "$3") || { note "$cfg, $bench alone: skipped (the budget is spent)"; return; }
  [ "$preset" = sim ] && args+=(--steps 2 --warmup 1) || args+=(--steps 10 --warmup 3)
  echo "==== $cfg: moe-bench $bench ${args[*]}" >>"$out/race.log"
  timeout "$seconds" "$bin/moe-bench" "$bench" "${args[@]}" --python "$race_python" \
    --torch-script "$root/scripts/bench_torch_$bench.py" --torch-timeout "$((seconds * 2 / 3))" >"$race_tmp" 2>&1
  local rc=$?
  cat "$race_tmp" >>"$out/race.log"
  if ((rc == 0)); then
    note "$cfg, $bench alone:"
  else
    note "$cfg, $bench alone: $( ((rc == 124)) && echo "TIMED OUT after $seconds s" || echo "FAILED (exit $rc)") (race.log)"
  fi
  # The table's rows (ours print before PyTorch runs), and the first line of PyTorch's error if it had one.
  while IFS= read -r line; do note "    $line"; done < <(grep -E '^(routing: |variant |moelab |torch )' "$race_tmp")
  while IFS= read -r line; do note "    $line"; done < <(grep -m1 '^torch: ' "$race_tmp" | cut -c1-200)
}
if [ "$race" = off ]; then
  note "race: skipped (MOELAB_GPU_CHECK_RACE=off)"
elif [ -z "$bin" ]; then
  note "race: skipped (no binaries)"
else
  left=$((budget - (SECONDS - started)))
  if ((left < 90)); then
    note "race: skipped (${left} s left of the ${budget} s budget)"
  else
    : >"$out/race.log"
    race_tmp=$(mktemp)
    race_python=$(command -v python3 || echo /usr/bin/python3)  # the one with PyTorch (env.txt), else Debian's
    "$race_python" -c 'import torch' 2>/dev/null || race_python=/usr/bin/python3
    if [ "$preset" = sim ]; then
      race_one tiny "$left"
      ours_with_expert_gemm tiny padded 120
      ours_with_expert_gemm tiny per-expert 120
      alone_one attention tiny 120
      alone_one experts tiny 120
    else
      # The two races first (M keeps 120 s for the rest); then the rest by importance for the configs that raced,
      # each within what is left.
      race_one S $((left * 2 / 5))  # S is the cheaper of the two: M gets the rest
      raced=(S)
      left=$((budget - (SECONDS - started)))
      if ((left < 180)); then
        note "race M: skipped (${left} s left of the ${budget} s budget)"
      else
        race_one M $((left - 120))
        raced+=(M)
      fi
      for cfg in "${raced[@]}"; do ours_with_expert_gemm "$cfg" padded 40; done
      for cfg in "${raced[@]}"; do alone_one experts "$cfg" 40; done
      for cfg in "${raced[@]}"; do alone_one attention "$cfg" 40; done
      for cfg in "${raced[@]}"; do ours_with_expert_gemm "$cfg" per-expert 40; done
    fi
    rm -f "$race_tmp"
  fi
fi

note "total: $((SECONDS - started)) s"
printf '%s\n' "${summary[@]}" >"$out/summary.txt"
echo "==== summary ($out)"
cat "$out/summary.txt"
