#!/usr/bin/env bash
# Make sure the base image for inference images exists in the local daemon.
# Order: already present -> pull it -> (only for the project's local default
# name) build it from Debian packages with debootstrap and `docker import`.
# Prints nothing on stdout but progress; exits non-zero with a reason on failure.
set -euo pipefail
BASE="${NIGHTSHIFT_BASE_IMAGE:-nightshift/base:bookworm}"
LOCAL_DEFAULT="nightshift/base:bookworm"

if docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "base image: $BASE present"
  exit 0
fi

echo "base image: $BASE not present; trying 'docker pull'"
if timeout 60 docker pull "$BASE" >/dev/null 2>&1; then
  echo "base image: pulled $BASE"
  exit 0
fi

if [ "$BASE" != "$LOCAL_DEFAULT" ]; then
  cat >&2 <<MSG
base image: could not pull $BASE and it is not the project's local default.
  Pull or load it into the daemon yourself ('docker pull $BASE' or 'docker load'),
  or unset NIGHTSHIFT_BASE_IMAGE to use $LOCAL_DEFAULT, which this script can
  build offline from Debian packages.
MSG
  exit 1
fi

if [ "$(id -u)" != "0" ]; then
  echo "base image: building $LOCAL_DEFAULT needs root (debootstrap); run as root or 'docker load' an image with python3 (3.11) as $LOCAL_DEFAULT" >&2
  exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
  echo "base image: installing debootstrap"
  apt_log=$(mktemp)
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >"$apt_log" 2>&1 || {
    echo "apt-get install debootstrap failed:" >&2; tail -n 20 "$apt_log" >&2; exit 1; }
  rm -f "$apt_log"
}

# Use the Debian mirror this machine's apt is configured with.
mirror="${NIGHTSHIFT_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "base image: no Debian mirror found in apt sources; set NIGHTSHIFT_DEBIAN_MIRROR" >&2; exit 1; }

root=$(mktemp -d /tmp/nightshift-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image: debootstrap bookworm (minbase + python3) into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  echo "base image: debootstrap failed; last lines:" >&2; tail -n 20 "$root.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/usr/bin/python3"]' - "$LOCAL_DEFAULT" >/dev/null
rm -f "$root.log"
echo "base image: built $LOCAL_DEFAULT ($(docker image inspect -f '{{.Size}}' "$LOCAL_DEFAULT") bytes)"
