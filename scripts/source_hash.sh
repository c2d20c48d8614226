#!/usr/bin/env bash
# Prints one hash of the files a build reads: every file git tracks or would track (untracked, not ignored), as they
# are in the work tree. Works without .git too (a copy of the tree): then every file but build outputs and runs.
# scripts/gpu_prepare.sh stamps its binaries with it; scripts/gpu_check.sh compares.
set -euo pipefail
cd "$(dirname "$0")/.."
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard
else
  find . -type f ! -path './.git/*' ! -path './build/*' ! -path './runs/*' ! -path './gpu-prepared/*' \
    ! -name '*.pyc' ! -path '*/__pycache__/*' -printf '%P\0'
fi | grep -zv '^gpu-prepared/' | sort -z | while IFS= read -r -d '' f; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then printf '%s\0' "$f"; fi  # not deleted files; links are not in a copy
done | xargs -0 sha256sum | sha256sum | cut -c1-16
