#!/usr/bin/env bash
# Make sure a Docker daemon is reachable. When none is and we run as root, start
# one the way this project's machines allow: no bridge network, no iptables, no
# masquerading (containers use --network host and bind 127.0.0.1 only).
set -euo pipefail
NS_HOME="${NIGHTSHIFT_HOME:-$(pwd)/.nightshift}"
mkdir -p "$NS_HOME"

if docker info >/dev/null 2>&1; then
  echo "docker: daemon reachable ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  cat >&2 <<MSG
docker: no Docker daemon is reachable and this user cannot start one.
  Start Docker (e.g. 'sudo systemctl start docker', Docker Desktop, or
  'sudo dockerd --bridge=none --iptables=false --ip-masq=false &'), or set
  DOCKER_HOST to a reachable daemon, then run this again.
MSG
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker: dockerd not installed; installing Debian's docker.io"
  apt_log=$(mktemp)
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >"$apt_log" 2>&1 || {
    echo "apt-get install docker.io failed:" >&2; tail -n 20 "$apt_log" >&2; exit 1; }
  rm -f "$apt_log"
fi

log="$NS_HOME/dockerd.log"
echo "docker: starting dockerd (log: $log)"
# setsid: the daemon outlives this script, as a system service would.
setsid dockerd --bridge=none --iptables=false --ip-masq=false \
  --pidfile "$NS_HOME/dockerd.pid" >"$log" 2>&1 < /dev/null &

for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "docker: daemon up ($(docker info --format '{{.ServerVersion}} storage={{.Driver}}'))"
    exit 0
  fi
  sleep 1
done
echo "docker: dockerd did not become ready within 60s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
