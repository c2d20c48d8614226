#!/usr/bin/env bash
# Checks that the C/C++/CUDA files changed since BASE are formatted as .clang-format says (clang-format 14).
#   bash scripts/check_format.sh [BASE]
# Checked: the files changed between BASE (default HEAD~1; with no HEAD~1, nothing is checked) and HEAD, plus the
# uncommitted changes (staged, unstaged and untracked files); deleted files and third_party/ are skipped. A branch as
# BASE (e.g. origin/main) is compared from its merge base with HEAD. Prints each badly formatted file with the diff
# that would fix it (`clang-format -i FILE` applies it) and exits 1 if there is any; exits 2 on a usage error.
# CLANG_FORMAT=/path/to/clang-format picks the binary.
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

# Changed since `from`, committed or not (git diff against the work tree), and untracked files; NUL-separated.
files=()
while IFS= read -r -d '' f; do
  case "$f" in
    third_party/*) continue ;;
    *.c | *.cc | *.cpp | *.cxx | *.h | *.hh | *.hpp | *.hxx | *.cu | *.cuh) ;;
    *) continue ;;
  esac
  if [ -f "$f" ]; then files+=("$f"); fi  # --diff-filter=d leaves out deleted files; this also skips unstaged deletions
done < <({
  git diff -z --name-only --diff-filter=d "$from" --
  git ls-files -z --others --exclude-standard
} | sort -zu)

echo "check_format: $("$clang_format" --version | head -n1); ${#files[@]} C/C++/CUDA file(s) changed since" \
  "$(git rev-parse --short "$from") ($base)"
bad=0
for f in "${files[@]}"; do
  if ! out=$("$clang_format" --style=file "$f" | diff -u --label "$f" --label "$f (clang-format)" "$f" -); then
    echo "--- $f is not formatted (fix: clang-format -i $(printf %q "$f")):"
    echo "$out"
    bad=$((bad + 1))
  fi
done
if ((bad)); then
  echo "check_format: $bad of ${#files[@]} file(s) not formatted; run clang-format -i on them"
  exit 1
fi
echo "check_format: all ${#files[@]} formatted"
