#!/usr/bin/env bash
# The cluster profile's system servers, installed the way scripts/ensure_docker.sh
# installs docker.io: Debian's PostgreSQL and Redis, with apt-get, as root, only
# when missing. Neither is started as a system service: scripts/cluster/cluster.py
# runs both on 127.0.0.1 with their state under .nightshift/cluster/.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ "${#missing[@]}" -eq 0 ] && { echo "cluster: postgresql and redis-server installed"; exit 0; }

if [ "$(id -u)" != "0" ]; then
  echo "cluster: ${missing[*]} not installed and this user cannot install them;" \
       "run 'sudo apt-get install ${missing[*]}' (or make cluster as root)" >&2
  exit 1
fi
echo "cluster: installing Debian's ${missing[*]}"
apt_log=$(mktemp)
# policy-rc.d: the packages' post-install scripts must not start the system-wide services
# (on 5432/6379, all interfaces); the profile runs its own instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1 || {
  echo "apt-get install ${missing[*]} failed:" >&2; tail -n 20 "$apt_log" >&2; exit 1; }
rm -f "$apt_log"
echo "cluster: installed ${missing[*]}"
