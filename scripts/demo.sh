#!/usr/bin/env bash
# The main job, on a fresh machine: build the small default corpus (Debian + npm packages), train two short runs of
# the tiny MoE on the CPU — a baseline and one with the Expert Divergence loss — evaluate both per domain, analyze
# their expert specialization, and write one HTML report. Everything lands under runs/demo (MOELAB_RUNS overrides);
# the corpus under ~/.cache/moelab (MOELAB_CORPUS). MOELAB_DEMO_STEPS sets the training steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"

corpus=${MOELAB_CORPUS:-$HOME/.cache/moelab/corpus-demo}
runs=${MOELAB_RUNS:-runs/demo}
steps=${MOELAB_DEMO_STEPS:-1500}
bin=build/release/bin
# Sleeping (not spinning) OpenMP workers: on a machine shared with other work, spinning threads stall each other.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

echo "== corpus (8 domains, 0.5 MB each) -> $corpus"
/usr/bin/python3 scripts/build_corpus.py --cap-mb 0.5 --out "$corpus" --quiet

for run in baseline:0 ed:0.01; do
  name=${run%%:*} beta=${run##*:}
  echo "== training $name (tiny MoE, beta = $beta, $steps steps) -> $runs/$name"
  "$bin/moe-train" --preset tiny --data.corpus "$corpus" --train.steps "$steps" --moe.beta "$beta" \
    --train.eval_every 250 --train.out_dir "$runs/$name"
done

echo "== held-out evaluation per domain (CE, perplexity, bits per byte, router-permutation dPPL)"
"$bin/moe-eval" "$runs/baseline" "$runs/ed" --max-batches 16 --json "$runs/eval.json"

echo "== expert specialization -> $runs/report"
"$bin/moe-analyze" "$runs/baseline" "$runs/ed" --out "$runs/report" --title "moelab demo: baseline vs expert divergence" \
  --trace 'int main(void) { return 0; }\nThe LORD is my shepherd; I shall not want.'

echo
echo "== where everything went"
for name in baseline ed; do
  echo "  $runs/$name/metrics.jsonl          training log (per step; eval lines hold per-domain validation CE)"
  echo "  $runs/$name/checkpoints/final/      model.safetensors + state.safetensors"
done
echo "  $runs/eval.json                     per-domain CE, PPL, bits per byte, dPPL"
echo "  $runs/report/analysis.json, *.csv   every specialization metric as data"
echo "  $corpus/                            corpus (train.jsonl, val.jsonl, manifest.json)"
echo
echo "report: $(cd "$runs/report" && pwd)/report.html"
