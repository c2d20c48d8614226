#!/usr/bin/env bash
# The main job, on a fresh machine: build the small default corpus (Debian + npm packages), train two short runs of
# the tiny MoE on the CPU — a baseline and one with the Expert Divergence loss — and show the per-domain validation
# loss falling. Everything lands under runs/demo (override with MOELAB_RUNS); the corpus under ~/.cache/moelab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"

corpus=${MOELAB_CORPUS:-$HOME/.cache/moelab/corpus-demo}
runs=${MOELAB_RUNS:-runs/demo}
steps=${MOELAB_DEMO_STEPS:-1500}
# Sleeping (not spinning) OpenMP workers: on a machine shared with other work, spinning threads stall each other.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
bin=build/release/bin

echo "== corpus (8 domains, 0.5 MB each) -> $corpus"
/usr/bin/python3 scripts/build_corpus.py --cap-mb 0.5 --out "$corpus" --quiet

for run in baseline:0 ed:0.01; do
  name=${run%%:*} beta=${run##*:}
  echo "== training $name (tiny MoE, beta = $beta, $steps steps) -> $runs/$name"
  "$bin/moe-train" --preset tiny --data.corpus "$corpus" --train.steps "$steps" --moe.beta "$beta" \
    --train.eval_every 100 --train.out_dir "$runs/$name"
done

echo
echo "== where everything went"
for name in baseline ed; do
  echo "  $runs/$name/metrics.jsonl            metrics log (per step; eval lines hold per-domain validation CE)"
  echo "  $runs/$name/checkpoints/final/        model.safetensors + state.safetensors"
done
echo "  $corpus/                              corpus (train.jsonl, val.jsonl, manifest.json)"
