#!/usr/bin/env bash
# Installs the Debian packages fedasr needs when they are missing:
#   espeak-ng, flite (text-to-speech for the synthetic corpus), sox (resampling),
#   libsndfile1 (FLAC I/O for soundfile).
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v flite >/dev/null || missing+=(flite)
command -v sox >/dev/null || missing+=(sox)
ldconfig -p 2>/dev/null | grep -q libsndfile.so.1 || missing+=(libsndfile1)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
if ! command -v apt-get >/dev/null; then
  echo "error: please install ${missing[*]} with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
