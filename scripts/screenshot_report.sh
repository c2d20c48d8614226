#!/usr/bin/env bash
# Renders an HTML report (moe-analyze's report.html) in headless Chromium (Debian's `chromium` package) to a PNG,
# offline: a fresh throw-away profile, no network services, no GPU.
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH [HEIGHT]]     (default 1280 x 2000)
# CHROMIUM overrides the browser binary (default: chromium on PATH, then /usr/bin/chromium).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH [HEIGHT]]" >&2
  exit 2
fi
report=$(realpath "$1")
out=$2
width=${3:-1280}
height=${4:-2000}
browser=${CHROMIUM:-$(command -v chromium || echo /usr/bin/chromium)}
if [ ! -x "$browser" ]; then
  echo "$0: no Chromium at '$browser' (install Debian's package: apt-get install chromium)" >&2
  exit 3
fi
if [ ! -f "$report" ]; then
  echo "$0: no report at '$1'" >&2
  exit 2
fi
profile=$(mktemp -d "${TMPDIR:-/tmp}/moelab-chromium.XXXXXX")
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
# Chromium logs harmless D-Bus complaints on machines without a session bus: only its exit status and the PNG count.
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --screenshot="$out" --window-size="$width,$height" "file://$report" >"$profile/log" 2>&1 || {
  status=$?
  echo "$0: chromium failed (exit $status):" >&2
  tail -n 20 "$profile/log" >&2
  exit 1
}
if [ ! -s "$out" ]; then
  echo "$0: chromium wrote no screenshot to $out:" >&2
  tail -n 20 "$profile/log" >&2
  exit 1
fi
echo "$out"
