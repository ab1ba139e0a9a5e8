#!/usr/bin/env bash
# Make sure an image registry listens on 127.0.0.1 (loopback only), for pushing
# inference images in tests and locally. Uses Debian's docker-registry (Docker
# Distribution 2.8); storage under $NIGHTSHIFT_HOME/registry. Set
# NIGHTSHIFT_REGISTRY_PORT (default 5005; 5000 is the MLflow UI). Idempotent.
set -euo pipefail
NS_HOME="${NIGHTSHIFT_HOME:-$(pwd)/.nightshift}"
PORT="${NIGHTSHIFT_REGISTRY_PORT:-5005}"
ADDR="127.0.0.1:${PORT}"
mkdir -p "$NS_HOME/registry"

if curl -fsS --noproxy '*' -m 2 "http://$ADDR/v2/" >/dev/null 2>&1; then
  echo "registry: up at $ADDR"
  exit 0
fi

if ! command -v docker-registry >/dev/null 2>&1; then
  if [ "$(id -u)" != "0" ]; then
    echo "registry: docker-registry is not installed and this user cannot install it (apt-get install docker-registry)" >&2
    exit 1
  fi
  echo "registry: installing Debian's docker-registry"
  apt_log=$(mktemp)
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry; } \
    >"$apt_log" 2>&1 || { echo "apt-get install docker-registry failed:" >&2; tail -n 20 "$apt_log" >&2; exit 1; }
  rm -f "$apt_log"
fi

cfg="$NS_HOME/registry/config.yml"
cat >"$cfg" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $NS_HOME/registry/data
  delete:
    enabled: true
http:
  addr: $ADDR
YML
log="$NS_HOME/registry/registry.log"
echo "registry: starting on $ADDR (log: $log)"
# setsid: the registry outlives this script, as a system service would.
setsid docker-registry serve "$cfg" >"$log" 2>&1 </dev/null &
echo $! >"$NS_HOME/registry/registry.pid"
for _ in $(seq 1 50); do
  if curl -fsS --noproxy '*' -m 2 "http://$ADDR/v2/" >/dev/null 2>&1; then
    echo "registry: up at $ADDR"
    exit 0
  fi
  sleep 0.2
done
echo "registry: did not answer on $ADDR; log tail:" >&2
tail -n 20 "$log" >&2
exit 1
