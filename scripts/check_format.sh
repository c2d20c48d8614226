#!/usr/bin/env bash
# Checks that the lines of C/C++/CUDA changed since BASE are formatted as .clang-format says (clang-format 14).
#   bash scripts/check_format.sh [BASE]
# Checked: the lines changed between BASE (default HEAD~1; with no HEAD~1, nothing is checked) and the work tree, in
# tracked files (`git add -N FILE` brings in a new one); third_party/ is skipped. Only changed lines: older code keeps
# its layout until someone edits it. A branch as BASE (e.g. origin/main) is compared from its merge base with HEAD.
# Prints the diff that would fix them (`git clang-format BASE` applies it) and exits 1 if there is any; exits 2 on a
# usage error. CLANG_FORMAT=/path/to/clang-format picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."

clang_format=${CLANG_FORMAT:-clang-format}
if ! command -v "$clang_format" >/dev/null; then
  echo "check_format: $clang_format not found (Debian: apt-get install clang-format, or bash scripts/install_deps.sh)" >&2
  exit 2
fi

if (($# > 1)); then
  echo "usage: $0 [BASE]" >&2
  exit 2
fi
if (($# == 1)); then
  base=$1
  if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
    echo "check_format: '$base' is not a commit" >&2
    exit 2
  fi
elif git rev-parse --verify --quiet "HEAD~1^{commit}" >/dev/null; then
  base=HEAD~1
else
  echo "check_format: no HEAD~1 (first commit or a shallow clone) and no BASE given: nothing to check"
  exit 0
fi
from=$(git merge-base "$base" HEAD 2>/dev/null || git rev-parse "$base")

echo "check_format: $("$clang_format" --version | head -n1); lines changed since $(git rev-parse --short "$from") ($base)"
out=$(git clang-format --binary "$(command -v "$clang_format")" --style file --diff \
  --extensions c,cc,cpp,cxx,h,hh,hpp,hxx,cu,cuh "$from" -- . ':(exclude)third_party')
case "$out" in
  "" | "no modified files to format" | "clang-format did not modify any files")
    echo "check_format: all changed lines formatted" ;;
  *)
    echo "$out"
    echo "check_format: the lines above are not formatted; run: git clang-format $base"
    exit 1 ;;
esac
