#!/usr/bin/env bash
# Debian packages the offline data sources need: CJK fonts for glyphs-hanzi and the Fashion-MNIST
# IDX files. Installs only what is missing; needs root (or sudo).
set -euo pipefail
packages=(dataset-fashion-mnist fonts-noto-cjk fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming
          fonts-lxgw-wenkai fonts-hanazono fonts-droid-fallback fonts-babelstone-han
          fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fontconfig)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "warning: not a Debian system; install these yourself for glyphs-hanzi / fashion-mnist: ${missing[*]}" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
