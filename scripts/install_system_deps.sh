#!/usr/bin/env bash
# Installs the Debian packages the demo needs when they are missing:
#   espeak-ng, flite, sox: only `fedasr synth` runs them (text-to-speech for the synthetic
#   corpus, and sox to bring it to 16 kHz); shard/train/eval on real data need none of them,
#   `pip install .[export,flower]` is enough there (docs/data.md);
#   libsndfile1 (FLAC I/O; the soundfile wheel also carries its own copy);
#   qemu-user (tests only: int8 decoding on an emulated AVX2 CPU without VNNI; that test is
#   skipped without it, so a failed install of it is a warning, not an error).
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v flite >/dev/null || missing+=(flite)
command -v sox >/dev/null || missing+=(sox)
ldconfig -p 2>/dev/null | grep -q libsndfile.so.1 || missing+=(libsndfile1)
if ! command -v qemu-x86_64 >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user >/dev/null 2>&1 \
    || echo "warning: qemu-user not installed: the emulated-CPU int8 test will be skipped" >&2
fi
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
