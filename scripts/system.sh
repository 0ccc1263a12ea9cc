#!/usr/bin/env bash
# Debian packages the sandboxes, the stream tests and the viewer tests need. Idempotent:
# installs only what is missing, so a second run costs a few dpkg queries.
set -euo pipefail
PKGS=(bubblewrap redis-server redis-tools debootstrap docker.io openssl chromium chromium-driver "$@")
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[kpop setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
