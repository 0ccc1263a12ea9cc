#!/usr/bin/env bash
# Makes the docker sandbox backend usable: Debian docker.io installed, a daemon reachable,
# and the sandbox image (debootstrap minbase + python3, imported with no registry) present.
# Idempotent and cached: the rootfs tarball lives under $KPOP_CACHE keyed by this script's
# hash, and the image carries that key as a label, so a second run only asks `docker`.
# Usage: bash scripts/docker.sh            (env: KPOP_SANDBOX_IMAGE, KPOP_CACHE, KPOP_DEBIAN_MIRROR)
set -euo pipefail
IMAGE="${KPOP_SANDBOX_IMAGE:-kpop-sandbox:latest}"
CACHE="${KPOP_CACHE:-$HOME/.cache/kpop}"
MIRROR="${KPOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
KEY="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
TARBALL="$CACHE/sandbox-rootfs-$SUITE-$KEY.tar"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "[kpop docker] $*" >&2; }
mkdir -p "$CACHE"

# 1. Packages.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. A reachable daemon. overlay2 first (container start is much faster), vfs where the
# filesystem cannot host overlay. No bridge and no iptables: sandboxes use network "none"
# by default and the host network only when asked.
if ! $SUDO docker info >/dev/null 2>&1; then
  started=""
  for driver in overlay2 vfs; do
    log "starting dockerd (storage driver $driver), log: $CACHE/dockerd.log"
    $SUDO bash -c "nohup dockerd --storage-driver=$driver --iptables=false --bridge=none \
      >>'$CACHE/dockerd.log' 2>&1 & echo \$! > '$CACHE/dockerd.pid'"
    for _ in $(seq 60); do
      if $SUDO docker info >/dev/null 2>&1; then started=$driver; break; fi
      kill -0 "$(cat "$CACHE/dockerd.pid")" 2>/dev/null || break
      sleep 0.5
    done
    [ -n "$started" ] && break
    $SUDO kill "$(cat "$CACHE/dockerd.pid")" 2>/dev/null || true
    sleep 1
  done
  if [ -z "$started" ]; then
    log "dockerd did not come up; see $CACHE/dockerd.log"; exit 1
  fi
  log "dockerd up (storage driver $started)"
fi

# 3. The image, built locally from a cached rootfs tarball.
have="$($SUDO docker image inspect -f '{{ index .Config.Labels "kpop.rootfs" }}' "$IMAGE" 2>/dev/null || true)"
if [ "$have" = "$KEY" ]; then
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  log "debootstrap $SUITE minbase + python3 (first run only, a few minutes)"
  ROOTFS="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap '$SUDO rm -rf "$ROOTFS"' EXIT
  $SUDO debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $CACHE/debootstrap.log"; exit 1; }
  # Sandboxes need python3 and coreutils, not package caches or documentation.
  $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
  $SUDO mkdir -p "$ROOTFS/work"
  $SUDO chmod 1777 "$ROOTFS/work"
  $SUDO tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi
log "docker import $TARBALL as $IMAGE"
$SUDO docker import \
  --change "LABEL kpop.rootfs=$KEY" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'WORKDIR /work' \
  --change 'CMD ["/bin/sh"]' \
  "$TARBALL" "$IMAGE" >/dev/null
log "image $IMAGE ready"
